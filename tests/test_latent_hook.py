"""The latent-update hook: gradients flow from attention probabilities back to the latents."""

import torch

import attnctrl as ac
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs, stock_latents


class PushToken(ac.Control):
    """Minimal Attend-and-Excite-shaped control: raise token 2's peak attention by a gradient step."""

    name = "push"
    default_layers = "cross,res=16"

    def __init__(self, step_size):
        super().__init__()
        self.step_size = step_size
        self.grads = []  # what the test reads back: one gradient per update

    def begin(self, run):
        run.store[self] = []  # this run's maps of the current gradient pass

    def needs_probs(self, call):
        return torch.is_grad_enabled()  # only while optimising: the main pass stays on SDPA

    def probs(self, call, p):
        call.run.store[self].append(p[call.run.layout.rows("cond"), :, call.q_image, 2].mean(1))
        return p

    def before_step(self, run, latents, denoise):
        if run.state.index > 0:
            return latents
        with torch.enable_grad():
            x = latents.detach().requires_grad_(True)
            maps = run.store[self]
            maps.clear()
            denoise(x)
            loss = 1 - torch.stack([m.max() for m in maps]).mean()
            (grad,) = torch.autograd.grad(loss, x)
        self.grads.append(grad)
        return (x - self.step_size * grad).detach()


def test_before_step_gets_gradients_through_the_processors(tiny):
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd")
    push = PushToken(step_size=50.0)
    out = ControlledPipeline(pipe)("a red car", seed=0, controls=[push], **kw)
    assert len(push.grads) == 1 and push.grads[0].abs().sum() > 0
    assert (out.images - stock_latents(pipe, "a red car", **kw)).abs().max() > 1e-3


def test_zero_step_size_equals_stock(tiny):
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd")
    out = ControlledPipeline(pipe)("a red car", seed=0, controls=[PushToken(step_size=0.0)], **kw)
    assert (out.images - stock_latents(pipe, "a red car", **kw)).abs().max().item() <= 1e-5
