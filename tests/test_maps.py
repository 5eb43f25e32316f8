"""AttentionMaps: normalised per-token maps, per image, with bounded memory."""

import pytest
import torch
from PIL import Image

import attnctrl as ac
from attnctrl.pipelines import ControlledPipeline
from attnctrl.tokens import TokenError, TruncatedError
from conftest import call_kwargs

PROMPTS = ["a red car and a white sheep", "a dog on a blue bench"]


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_maps_are_distributions_over_text_per_image(tiny, name):
    out = ControlledPipeline(tiny(name))(
        PROMPTS, seed=0, controls=[ac.AttentionMaps()], **call_kwargs(name, num_images_per_prompt=2)
    )
    maps = out.maps
    assert maps.num_images == 4
    for (h, w), m in maps.by_res.items():
        assert m.shape[0] == 4 and m.shape[-2:] == (h, w)
        assert (m >= 0).all()
        assert torch.allclose(m.sum(1), torch.ones(4, h, w), atol=1e-5)
    combined = maps.combined()
    assert torch.allclose(combined.sum(1), torch.ones_like(combined.sum(1)), atol=1e-5)
    # different prompts attend differently; two samples of one prompt differ too (different noise)
    assert not torch.allclose(combined[0], combined[2])
    assert not torch.allclose(combined[0], combined[1])


class SizeProbe(ac.AttentionMaps):
    """AttentionMaps that records how many numbers its running sums hold after every layer call."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def observe(self, call, block):
        super().observe(call, block)
        self.sizes.append(sum(total.numel() for total, _ in call.run.store[self].values()))


def test_memory_does_not_grow_with_steps(tiny):
    pipe = ControlledPipeline(tiny("tiny-sd"))
    peaks = []
    for steps in (2, 8):
        probe = SizeProbe()
        pipe("a red car", seed=0, controls=[probe], **call_kwargs("tiny-sd", num_inference_steps=steps))
        calls_per_step = len(probe.sizes) // steps
        assert probe.sizes[calls_per_step - 1] == probe.sizes[-1]  # full after step 0, flat afterwards
        peaks.append(max(probe.sizes))
    assert peaks[0] == peaks[1] == 77 * (32 * 32 + 16 * 16 + 8 * 8)  # 1 image, 77 tokens, 3 grids


def test_resolutions_and_words(tiny):
    out = ControlledPipeline(tiny("tiny-sd"))(
        PROMPTS[0], seed=0, controls=[ac.AttentionMaps(resolutions=[16])], **call_kwargs("tiny-sd")
    )
    assert out.maps.resolutions == [(16, 16)]
    words = out.maps.words(0)
    assert list(words) == ["a", "red", "car", "and", "a#2", "white", "sheep"]
    # a one-token word's map is exactly that token's map (CLIP: BOS at 0, "car" is token 3)
    assert torch.equal(words["car"], out.maps.combined()[0, 3])
    with pytest.raises(TokenError, match="sheep"):
        out.maps.word(0, "goat")


def test_render_writes_labelled_grid(tiny, tmp_path):
    pipe = ControlledPipeline(tiny("tiny-sd"))
    out = pipe(PROMPTS[0], seed=0, controls=[ac.AttentionMaps()], num_inference_steps=2)
    grid = out.maps.render(0, out.images[0])
    assert isinstance(grid, Image.Image) and grid.width > 160 * 4
    path = out.maps.save(tmp_path / "maps.png", 0, out.images[0])
    assert Image.open(path).size == grid.size


def test_selector_with_no_match_is_an_error_and_leaves_pipeline_alone(tiny):
    pipe = tiny("tiny-sd")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(ac.SelectorError, match="res=64"):
        ControlledPipeline(pipe)(
            "a car", seed=0, controls=[ac.AttentionMaps(resolutions=[64])], **call_kwargs("tiny-sd")
        )
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


@pytest.mark.parametrize("name, prefix", [("tiny-sd3", 77), ("tiny-flux", 0)])
def test_joint_attention_words_map_to_t5_positions(tiny, name, prefix):
    """SD3's text tokens are [CLIP 77, T5]; FLUX's are T5 only: a word's map includes its T5 token."""
    from attnctrl.models.tiny import t5_tokenizer

    out = ControlledPipeline(tiny(name))("a red car", seed=0, controls=[ac.AttentionMaps()], **call_kwargs(name))
    ids = t5_tokenizer()("a red car").input_ids
    t5_pos = ids.index(t5_tokenizer().convert_tokens_to_ids("▁car"))
    combined = out.maps.combined()[0]
    expected = combined[prefix + t5_pos] + (combined[3] if name == "tiny-sd3" else 0)  # CLIP "car" is index 3
    assert torch.allclose(out.maps.word(0, "car"), expected)


def test_repeated_words_in_any_case_get_their_own_maps(tiny):
    """ "A Cat and a cat": the second cat is "cat#2" (counted case-insensitively, as words resolve),
    and its map is its own token's (token 5), not the first cat's (token 2)."""
    from attnctrl.app.runner import word_choices
    from attnctrl.tokens import word_labels

    prompt = "A Cat and a cat"
    assert word_labels(prompt) == ["A", "Cat", "and", "a#2", "cat#2"]
    assert word_choices(prompt) == word_labels(prompt)  # the app's chips are the same labels
    out = ControlledPipeline(tiny("tiny-sd"))(prompt, seed=0, controls=[ac.AttentionMaps()], **call_kwargs("tiny-sd"))
    words = out.maps.words(0)
    assert list(words) == word_labels(prompt)
    combined = out.maps.combined()[0]
    for label, token in zip(words, [1, 2, 3, 4, 5]):  # CLIP: <|startoftext|> a cat and a cat
        assert torch.equal(words[label], combined[token])


def test_a_long_prompt_keeps_the_maps_of_what_the_encoder_saw_and_names_the_rest(tiny):
    pipe = ControlledPipeline(tiny("tiny-sd"))
    prompt = " ".join(["a red car"] * 30) + " and a white sheep"  # 94 words: CLIP keeps 75 prompt tokens
    out = pipe(prompt, seed=0, controls=[ac.AttentionMaps()], **call_kwargs("tiny-sd", num_inference_steps=1))
    words = out.maps.words(0)
    cut = out.maps.truncated(0)
    assert len(words) == 75 and list(words)[:3] == ["a", "red", "car"]  # one token per word here: 75 kept
    assert cut[0] == "a#26" and cut[-3:] == ["a#31", "white", "sheep"] and len(words) + len(cut) == 94
    assert torch.equal(words["car#25"], out.maps.combined()[0, 75])  # the last kept word, token 75
    with pytest.raises(TruncatedError, match="'sheep' is entirely truncated away"):
        out.maps.word(0, "sheep")
    grid = out.maps.render(0)
    assert grid.width > 0  # renders the kept words (its title names the cut)
    with pytest.raises(TokenError, match="sheep"):  # a control that names a truncated word fails, before step 1
        pipe(prompt, seed=0, controls=[ac.AttendExcite(tokens=["sheep"])], **call_kwargs("tiny-sd"))
