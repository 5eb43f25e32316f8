"""Train the Shapes model: ``python -m attnctrl.shapes.train [--out DIR] [--resume] [--ship]``.

Stage 1 trains the VAE on 32 px crops (MSE + L1 reconstruction, shape pixels weighted ×5, + a
small KL term); then the latent scaling factor
is set to 1/std of the latents; stage 2 trains the text encoder and UNet jointly with the standard
ε-prediction DDPM loss, dropping 10% of captions (so classifier-free guidance works) and keeping an
EMA of their weights, which is what is saved. Batches are drawn on the fly from
:func:`attnctrl.shapes.data.samples`, seeded by (seed, stage, step), so a run is reproducible and a
resumed run (``--resume``, from ``DIR/checkpoint.pt``) continues exactly; ``--resume --steps N`` with a
larger N trains a finished run longer (the learning-rate schedule stretches to the new length). Losses go to
``DIR/losses.csv``; the final pipeline to ``DIR/pipeline`` (and ``attnctrl.assets/shapes`` with
``--ship``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import samples
from .model import MAX_LENGTH, assets_dir, build_untrained, save_shapes_pipeline

__all__ = ["TrainConfig", "main", "train"]


@dataclass
class TrainConfig:
    seed: int = 0
    vae_steps: int = 700
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    fg_weight: float = 4.0
    kl_weight: float = 1e-6
    steps: int = 1400
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    caption_dropout: float = 0.1
    ema_decay: float = 0.99
    scale_batches: int = 8
    checkpoint_every: int = 100
    threads: int = 1


def _batch(cfg: TrainConfig, stage: int, step: int, size: int, device) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (N,3,64,64) and captions, a function of (seed, stage, step) only."""
    pairs = list(samples((cfg.seed * 7919 + stage) * 10_000_000 + step, size))
    x = np.stack([np.asarray(img, np.float32) for img, _ in pairs]) / 127.5 - 1.0
    return torch.from_numpy(x).permute(0, 3, 1, 2).to(device), [scene.caption for _, scene in pairs]


def _generator(cfg: TrainConfig, stage: int, step: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed((cfg.seed * 7919 + stage) * 10_000_000 + step)


def _lr(cfg: TrainConfig, base: float, step: int, total: int) -> float:
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    stop_after: int | None = None,
):
    """Run (or resume) training into ``out``; return ``(pipeline, losses)``.

    ``losses`` lists ``(stage, step, loss)`` of every step so far (earlier calls' from the log).
    ``stop_after``: checkpoint and return ``(None, losses)`` after that many steps of this call
    (both stages counted), as an interrupted run would.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = build_untrained(cfg.seed)
    vae, text_encoder, unet, tokenizer, scheduler = (
        pipe.vae,
        pipe.text_encoder,
        pipe.unet,
        pipe.tokenizer,
        pipe.scheduler,
    )
    for m in (vae, text_encoder, unet):
        m.to(device)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    stage, step, elapsed, scaling = 1, 0, 0.0, None
    ckpt_path, log_path = out / "checkpoint.pt", out / "losses.csv"
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if {**state["config"], "steps": cfg.steps} != asdict(cfg) or cfg.steps < state["config"]["steps"]:
            raise ValueError(f"{ckpt_path} was written with another configuration: {state['config']}")
        vae.load_state_dict(state["vae"])
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        vae_opt.load_state_dict(state["vae_opt"])
        opt.load_state_dict(state["opt"])
        ema = [e.to(device) for e in state["ema"]]
        stage, step, elapsed, scaling = state["stage"], state["step"], state["elapsed"], state["scaling"]
        rows = [r for r in csv.DictReader(log_path.open())] if log_path.exists() else []
        keep = [r for r in rows if (int(r["stage"]), int(r["step"])) < (stage, step)]
    else:
        keep = []
    with log_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["stage", "step", "loss", "lr", "elapsed_s"])
        writer.writeheader()
        writer.writerows(keep)
    losses = [(int(r["stage"]), int(r["step"]), float(r["loss"])) for r in keep]
    log = log_path.open("a", newline="")
    writer = csv.DictWriter(log, ["stage", "step", "loss", "lr", "elapsed_s"])
    start = time.perf_counter() - elapsed
    done = 0

    class _Stop(Exception):
        pass

    def checkpoint():
        log.flush()
        _save_checkpoint(
            ckpt_path,
            {
                "config": asdict(cfg),
                "stage": stage,
                "step": step,
                "elapsed": time.perf_counter() - start,
                "scaling": scaling,
                "vae": vae.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "unet": unet.state_dict(),
                "vae_opt": vae_opt.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema,
            },
        )

    def record(loss: float, lr: float):
        nonlocal done
        done += 1
        losses.append((stage, step, loss))
        writer.writerow(
            {
                "stage": stage,
                "step": step,
                "loss": f"{loss:.6g}",
                "lr": f"{lr:.4g}",
                "elapsed_s": f"{time.perf_counter() - start:.1f}",
            }
        )

    try:
        if stage == 1:  # VAE
            vae.train()
            bar = tqdm(range(step, cfg.vae_steps), initial=step, total=cfg.vae_steps, desc="vae", disable=not progress)
            for step in bar:
                lr = _lr(cfg, cfg.vae_lr, step, cfg.vae_steps)
                for g in vae_opt.param_groups:
                    g["lr"] = lr
                x, _ = _batch(cfg, 1, step, cfg.vae_batch, device)
                gen = _generator(cfg, 1, step, device)
                x0, y0 = (torch.randint(0, 64 - cfg.vae_crop + 1, (2,), generator=gen, device=device) // 8 * 8).tolist()
                x = x[
                    :, :, y0 : y0 + cfg.vae_crop, x0 : x0 + cfg.vae_crop
                ]  # the VAE is convolutional: crops are cheaper
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample(gen)).sample
                weight = 1 + cfg.fg_weight * (x < 0.98).any(1, keepdim=True)  # shapes count more than background
                err = (recon - x) ** 2 + (recon - x).abs()
                loss = (weight * err).mean() / weight.mean() + cfg.kl_weight * posterior.kl().mean()
                vae_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
                vae_opt.step()
                record(loss.item(), lr)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if (step + 1) % cfg.checkpoint_every == 0 or done == stop_after:  # step + 1 is next to run
                    step += 1
                    checkpoint()
                    if done == stop_after:
                        raise _Stop
            vae.eval()
            with torch.no_grad():
                lat = torch.cat(
                    [vae.encode(_batch(cfg, 0, i, 64, device)[0]).latent_dist.mean for i in range(cfg.scale_batches)]
                )
            scaling = float(1.0 / lat.std())
            stage, step = 2, 0
            checkpoint()
        vae.eval().requires_grad_(False)
        text_encoder.train()
        unet.train()
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="unet+text", disable=not progress)
        for step in bar:
            lr = _lr(cfg, cfg.lr, step, cfg.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x, captions = _batch(cfg, 2, step, cfg.batch, device)
            gen = _generator(cfg, 2, step, device)
            drop = torch.rand(len(captions), generator=gen, device=device) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            with torch.no_grad():
                latents = vae.encode(x).latent_dist.sample(gen) * scaling
            noise = torch.randn(latents.shape, generator=gen, device=device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=gen, device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            ids = tokenizer(
                captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids.to(device)
            pred = unet(noisy, t, text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            record(loss.item(), lr)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or done == stop_after:  # step + 1 is next to run
                step += 1
                checkpoint()
                if done == stop_after:
                    raise _Stop
        step = cfg.steps
        checkpoint()
    except _Stop:
        return None, losses
    finally:
        log.close()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    vae.register_to_config(scaling_factor=scaling)
    for m in (vae, text_encoder, unet):
        m.eval().requires_grad_(False).to("cpu")
    wall = time.perf_counter() - start
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "wall_s": round(wall, 1),
                "scaling_factor": scaling,
                "device": str(device),
                "final_vae_loss": _tail_mean(losses, 1),
                "final_diffusion_loss": _tail_mean(losses, 2),
            },
            indent=2,
        )
        + "\n"
    )
    return pipe, losses


def _tail_mean(losses, stage: int, n: int = 100) -> float | None:
    vals = [loss for s, _, loss in losses if s == stage][-n:]
    return round(float(np.mean(vals)), 5) if vals else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnctrl.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/shapes", help="run folder: checkpoint, losses.csv, pipeline/")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--ship", action="store_true", help="also save the pipeline into attnctrl.assets/shapes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    for f in fields(TrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    pipe, _ = train(cfg, args.out, resume=args.resume, device=args.device)
    save_shapes_pipeline(copy.copy(pipe), Path(args.out) / "pipeline")
    if args.ship:
        save_shapes_pipeline(pipe, assets_dir())
    print(Path(args.out, "summary.json").read_text())


if __name__ == "__main__":
    main()
