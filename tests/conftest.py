import pytest
import torch

from autoprune.data import load_dataset
from autoprune.models import build_model
from autoprune.pretrain import train_model

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Keep pretrained weights of the test run out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_resnet20(digits):
    """A ResNet-20 trained briefly on digits: enough to be far better than chance."""
    model = build_model("resnet20", digits.in_channels, digits.num_classes, digits.image_size)
    acc = train_model(model, digits, 120, device=torch.device("cpu"))
    assert acc > 0.8
    return model.eval()
