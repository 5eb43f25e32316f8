"""Bad input gives a clear error naming the problem, and leaves the pipeline as it was."""

import pytest
import torch

import attnctrl as ac
from attnctrl.models.loading import ModelLoadError
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs, processors_of


@pytest.fixture
def sd(tiny):
    return ControlledPipeline(tiny("tiny-sd"))


@pytest.mark.parametrize(
    "prompt, kwargs, error, message",
    [
        ("", {}, ValueError, "prompt is empty"),
        ("   ", {}, ValueError, "prompt is empty"),
        (None, {}, ValueError, "no prompt"),
        (["a cat", ""], {}, ValueError, "prompt is empty"),
        ("a cat", {"num_inference_steps": -2}, ValueError, "num_inference_steps"),
        ("a cat", {"num_inference_steps": 2.5}, ValueError, "num_inference_steps"),
        ("a cat", {"height": -64}, ValueError, "height"),
        ("a cat", {"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
        ("a cat", {"guidance": 3.0}, TypeError, "no argument"),
        ("a cat", {"generator": torch.Generator()}, ValueError, "seed= or generator="),
        ("a cat", {"ip_adapter_image_embeds": [torch.zeros(1)]}, NotImplementedError, "ip_adapter"),
    ],
)
def test_bad_call_arguments(sd, prompt, kwargs, error, message):
    before = processors_of(sd.pipe)
    with pytest.raises(error, match=message):
        sd(prompt, seed=0, **kwargs)
    assert all(processors_of(sd.pipe)[k] is v for k, v in before.items())


def test_controls_must_be_controls(sd):
    with pytest.raises(TypeError, match="Control instances"):
        sd("a cat", seed=0, controls=["maps"])


def test_unknown_model_name_lists_embedded_models():
    with pytest.raises(ModelLoadError, match="tiny-sd") as err:
        ac.load("tiny-unicorn")
    assert "tiny-flux" in str(err.value)


def test_unlisted_pipeline_kind_is_refused_with_a_way_out(tiny):
    from diffusers import StableDiffusion3Img2ImgPipeline

    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(tiny("tiny-sd3"))
    with pytest.raises(TypeError, match="from_pipe"):
        ControlledPipeline(img2img)


def test_load_applies_embedded_defaults_and_equals_stock(tiny):
    pipe = ac.load("tiny-sd3")
    assert pipe.defaults == {"max_sequence_length": 32}
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red car", seed=1, num_inference_steps=2, output_type="latent")
    stock = tiny("tiny-sd3")(
        "a red car", generator=torch.Generator().manual_seed(1), **call_kwargs("tiny-sd3", num_inference_steps=2)
    )
    assert torch.equal(out.images, stock.images)
