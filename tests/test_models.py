"""The model zoo, torchvision and file factories by name, checkpoint loading and their errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from autoprune.errors import InputError
from autoprune.models import build_model, describe_models, list_models, load_checkpoint

ZOO = ["mobilenet_v2", "resnet110", "resnet20", "resnet32", "resnet56", "vgg16_bn"]
SHAPES = [(1, 8), (3, 32)]  # (channels, side): scikit-learn digits and CIFAR


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _assert_one_line_naming(error: pytest.ExceptionInfo[InputError], *names: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_list_models_names_the_zoo_sorted_and_describes_each_in_one_line() -> None:
    assert list_models() == ZOO
    descriptions = describe_models()
    assert list(descriptions) == ZOO
    assert all(text and "\n" not in text for text in descriptions.values())


@pytest.mark.parametrize("channels,side", SHAPES)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_gives_one_row_of_logits_per_image(name: str, channels: int, side: int) -> None:
    model = build_model(name, in_channels=channels, num_classes=7, image_size=side)
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, channels, side, side))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_dependency_graph_prunes_a_quarter_of_a_middle_group_and_the_model_still_runs(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    params_before = sum(p.numel() for p in model.parameters())
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    groups = list(graph.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]))
    root = groups[len(groups) // 2][0]
    channels = len(root.idxs)
    group = graph.get_pruning_group(root.dep.target.module, root.dep.handler, idxs=list(range(channels // 4)))
    assert graph.check_pruning_group(group)
    group.prune()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < params_before


def test_resnet20_has_the_papers_0_27m_parameters() -> None:
    model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    # 0.27M in He et al. (2016, Table 6); option-B shortcuts add about 3K.
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_zoo_names_read_like_module_paths() -> None:
    resnet = dict(build_model("resnet20", 3, 10, 32).named_modules())
    assert {"conv1", "bn1", "layer1.0.conv1", "layer2.0.downsample.0", "fc"} <= set(resnet)
    mobilenet = dict(build_model("mobilenet_v2", 3, 10, 32).named_modules())
    assert mobilenet["layers.1.conv2"].groups == mobilenet["layers.1.conv2"].in_channels  # depthwise
    assert "classifier" in mobilenet


@pytest.mark.parametrize("side,pools", [(8, 3), (32, 5)])
def test_vgg_drops_the_max_pools_that_would_shrink_a_1x1_map_keeping_module_names(
    side: int, pools: int
) -> None:
    model = build_model("vgg16_bn", in_channels=1, num_classes=10, image_size=side)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model.state_dict().keys() == build_model("vgg16_bn", 1, 10, 32).state_dict().keys()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_adapts_to_one_channel_and_seven_classes(arch: str) -> None:
    model = build_model(f"torchvision:{arch}", in_channels=1, num_classes=7, image_size=8).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
        rgb = build_model(f"torchvision:{arch}", in_channels=3, num_classes=7, image_size=32).eval()
        assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def _write_model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(num_classes, in_channels=3):
                return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))

            def fixed():
                return nn.Linear(64, 5)

            def not_a_model(num_classes):
                return "tiny"
            """
        )
    )
    return path


def test_file_factory_receives_the_keywords_it_accepts(tmp_path: Path) -> None:
    path = _write_model_file(tmp_path)
    model = build_model(f"{path}:tiny", in_channels=1, num_classes=4, image_size=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    assert isinstance(build_model(f"{path}:fixed", in_channels=1, num_classes=4, image_size=8), nn.Linear)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "data_parallel"])
def test_checkpoint_round_trip_restores_every_tensor(tmp_path: Path, layout: str) -> None:
    trained = build_model("resnet20", 1, 10, 8)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    state = trained.state_dict()
    payload = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {}},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    torch.save(payload, tmp_path / "ckpt.pt")
    fresh = build_model("resnet20", 1, 10, 8)
    load_checkpoint(fresh, tmp_path / "ckpt.pt")
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_unknown_zoo_name_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(InputError) as error:
        build_model("resnet21", 3, 10, 32)
    _assert_one_line_naming(error, "resnet21", "resnet20", "vgg16_bn", "torchvision:NAME")


def test_unknown_torchvision_model_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(InputError) as error:
        build_model("torchvision:resnet19", 3, 10, 32)
    _assert_one_line_naming(error, "resnet19", "resnet18", "mobilenet_v2")


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        build_model(f"{tmp_path}/absent.py:make", 3, 10, 32)
    _assert_one_line_naming(error, "absent.py", "does not exist")


def test_missing_factory_is_named_with_the_files_functions(tmp_path: Path) -> None:
    path = _write_model_file(tmp_path)
    with pytest.raises(InputError) as error:
        build_model(f"{path}:huge", 3, 10, 32)
    _assert_one_line_naming(error, "huge", "tiny", "fixed")


def test_factory_returning_something_else_than_a_module_is_refused(tmp_path: Path) -> None:
    path = _write_model_file(tmp_path)
    with pytest.raises(InputError) as error:
        build_model(f"{path}:not_a_model", 3, 10, 32)
    _assert_one_line_naming(error, "not_a_model", "str", "nn.Module")


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        load_checkpoint(build_model("resnet20", 3, 10, 32), tmp_path / "absent.pt")
    _assert_one_line_naming(error, "absent.pt", "does not exist")


def test_pickled_model_checkpoint_is_refused_as_not_a_state_dict(tmp_path: Path) -> None:
    model = build_model("resnet20", 3, 10, 32)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(InputError) as error:
        load_checkpoint(model, tmp_path / "whole.pt")
    _assert_one_line_naming(error, "whole.pt", "weights_only=True", "state dict")


def test_checkpoint_of_another_architecture_reports_missing_and_reshaped_keys(tmp_path: Path) -> None:
    torch.save(build_model("resnet20", 3, 10, 32).state_dict(), tmp_path / "r20.pt")
    with pytest.raises(InputError) as error:
        load_checkpoint(build_model("resnet32", 3, 10, 32), tmp_path / "r20.pt")
    _assert_one_line_naming(error, "r20.pt", "keys missing", "layer1.3.conv1.weight")
    with pytest.raises(InputError) as error:
        load_checkpoint(build_model("resnet20", 1, 10, 32), tmp_path / "r20.pt")
    _assert_one_line_naming(
        error, "1 key with another shape", "'conv1.weight'", "(16, 3, 3, 3)", "(16, 1, 3, 3)"
    )
