"""The trainer: data -> backend step -> EMA -> logging, evaluation and checkpoints.

    from arflow.config import load_config
    from arflow.train import run
    run(load_config("configs/digits_cpu.json"), resume="auto")

`run` is all a launcher calls; it joins the process group, trains and leaves the group. The
loop stops at `train.steps`, on SIGTERM / SIGUSR1 (after finishing the step and saving), or
after `train.max_nonfinite_steps` consecutive non-finite steps (without saving, so the last
good checkpoint stays the latest).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from arflow.checkpoint import CheckpointError, CheckpointManager, Found, check_compatible
from arflow.config import Config, ConfigError
from arflow.distributed.backend import Backend, StepResult, resolve_precision
from arflow.distributed.collectives import main_then_share
from arflow.distributed.ema import EMA, local_shard
from arflow.distributed.env import DistInfo, init_distributed, shutdown
from arflow.distributed.failure import FailureWatch
from arflow.distributed.parallelize import build_backend
from arflow.flow.transport import training_loss
from arflow.models import ARFlow, architecture_of, save_pretrained
from arflow.models.vae import load_vae
from arflow.storage import RetryPolicy
from arflow.utils.flops import peak_flops, train_flops_per_image
from arflow.utils.images import grid_pixels, save_grid
from arflow.utils.metrics import MetricsLogger, StepMetrics, peak_memory_gb
from arflow.utils.profiling import ProfileWindow
from arflow.utils.rng import preserved_rng, rng_state, seed_rank, set_rng_state
from arflow.utils.schedule import lr_at
from arflow.utils.signals import PreemptionSignals
from arflow.utils.synthetic import SyntheticLoader


class NonFiniteLossError(RuntimeError):
    pass


class TrainState:
    """What a rank carries from step to step besides model, optimizer and EMA: the step, the
    non-finite counters, the random streams (noise, label dropout) and the data position.
    `state_dict()` is the rank file of a checkpoint: tensors and plain values only, so it loads
    with torch.load(weights_only=True)."""

    def __init__(self, loader, seed: int, rank: int):
        self.loader, self.seed, self.rank = loader, seed, rank
        self.step = 0  # optimizer steps done (skipped ones included)
        self.skipped_total = 0  # steps skipped for a non-finite loss or gradient, since the start
        self.nonfinite_streak = 0  # of them, the consecutive ones up to now
        seed_rank(seed, rank)  # per-rank streams (model init happened before, from `seed` alone)

    def record(self, skipped: bool) -> None:
        self.step += 1
        self.skipped_total += skipped
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "skipped_total": self.skipped_total,
            "nonfinite_streak": self.nonfinite_streak,
            "rng": rng_state(),
            "data": self.loader.state_dict(),
        }

    def load_state_dict(self, state: dict, same_layout: bool = True) -> None:
        """Continue from `state`. With another world size (`same_layout` False, `state` from
        any old rank) the data pipeline re-plans the rest of the epoch from it (each sequence
        still seen once); random streams cannot be split the same way, so they restart from
        seeds derived from the step."""
        self.step = state["step"]
        self.skipped_total = state["skipped_total"]
        self.loader.load_state_dict(state["data"])
        if same_layout:
            self.nonfinite_streak = state["nonfinite_streak"]
            set_rng_state(state["rng"])
        else:
            seed_rank(self.seed + self.step, self.rank)


def storage_retry(cfg: Config) -> RetryPolicy:
    """The retries and timeouts of every object-storage request: data, checkpoints, run lock."""
    d = cfg.data
    return RetryPolicy(
        attempts=d.storage_attempts,
        connect_timeout=d.storage_connect_timeout,
        read_timeout=d.storage_read_timeout,
    )


def build_loader(cfg: Config, info: DistInfo):
    """The data pipeline for this rank, checked against the model's input shape."""
    d, m = cfg.data, cfg.model
    if d.url == "synthetic":
        return SyntheticLoader(
            sample_shape=(m.in_channels, m.input_size, m.input_size),
            num_classes=m.num_classes,
            seq_len=d.seq_len,
            batch_size=cfg.train.micro_batch_size,
            rank=info.rank,
            seed=cfg.run.seed,
        )
    from arflow.data import SequenceLoader

    loader = SequenceLoader(
        d.url,
        seq_len=d.seq_len,
        batch_size=cfg.train.micro_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=d.num_workers,
        seed=cfg.run.seed,
        class_sampling=d.class_sampling,
        storage_options=d.storage_options,
        pin_memory=info.device.type == "cuda",
        prefetch_factor=d.prefetch_factor,
        min_per_class=d.min_per_class,
        max_bad_samples=d.max_bad_samples,
        retry=storage_retry(cfg),
        # rank 0 reads the manifest and lists the shards for the world, not every rank
        share=functools.partial(main_then_share, info),
    )
    manifest = loader.manifest
    expected = (m.in_channels, m.input_size, m.input_size)
    if tuple(manifest.sample_shape) != expected:
        raise ConfigError(
            f"model.in_channels / model.input_size: the data at {d.url} has samples of shape "
            f"{tuple(manifest.sample_shape)}, the model expects {expected}"
        )
    if manifest.num_classes != m.num_classes:
        raise ConfigError(
            f"model.num_classes: the data at {d.url} has {manifest.num_classes} classes, the "
            f"config says {m.num_classes}"
        )
    return loader


def check_eval_files(cfg: Config) -> None:
    """The periodic evaluation's files (Inception weights, reference statistics) exist and its
    libraries are installed; checked at start, not at the first evaluation."""
    try:
        from arflow.eval import check_eval_files as check
    except ImportError as err:
        raise ConfigError(
            f"eval.every: periodic FID / IS needs the `eval` extra (pip install 'arflow[eval]'): "
            f"{err}"
        ) from err
    check(cfg.eval)


class Trainer:
    def __init__(
        self, cfg: Config, info: DistInfo, resume: str | None = None, overwrite: bool = False
    ):
        self.cfg = cfg.validate(info.world_size)
        self.info = info
        if cfg.eval.every:
            check_eval_files(cfg)  # hours before the first evaluation would find them missing
        self.run_dir = Path(cfg.run.dir)
        self.ckpt = CheckpointManager(
            cfg.checkpoint_dir,
            info,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.storage_options,
            retry=storage_retry(cfg),
            background=cfg.checkpoint.async_save,
            precision=resolve_precision(cfg, info.device),
        )
        self.grad_accum = cfg.grad_accumulation(info.world_size)
        arch = cfg.model.architecture()
        self.tokens_per_image = (cfg.model.input_size // arch["patch_size"]) ** 2
        self.flops_per_image = train_flops_per_image(arch, cfg.data.seq_len)
        self.profile = ProfileWindow(
            cfg.train.profile, self.run_dir / "profile", info.rank, info.device
        )

        # Ownership and the resume target first: a directory in use or not writable, and a
        # damaged or incompatible checkpoint, fail before anything is built.
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = self.ckpt.open(run_dir=str(self.run_dir))
        if removed and info.is_main:
            print(f"removed incomplete checkpoints at steps {removed}", flush=True)
        found = self.ckpt.resume_target(resume, overwrite)
        reshard = check_compatible(found, cfg, info) if found else False

        self.loader = build_loader(cfg, info)
        # Identical initial weights on every rank (DDP, fully_shard and ZeRO-3 partition them
        # from each rank's copy), then per-rank random streams for noise and label dropout.
        torch.manual_seed(cfg.run.seed)
        module = ARFlow(**arch)
        # Fixed tables (pos_embed) are not trainable, hence not in the EMA: kept for full_model.
        self._frozen = {
            n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad
        }
        self.backend: Backend = build_backend(module, cfg, info, reshard_resume=reshard)
        self.ema = EMA(self.backend.master_params(), cfg.ema.decay)
        self.state = TrainState(self.loader, cfg.run.seed, info.rank)
        if found:
            self._load(found, reshard)
        self.logger = MetricsLogger(cfg, info.is_main, self.step, resumed=found is not None)
        if found:
            self.logger.message(f"resumed from {found.url} at step {self.step}")
        # The VAE that decodes latent samples (grids, FID), loaded now so that a bad eval.vae or
        # one of another latent scale than the data fails before training; on the CPU between
        # evaluations.
        self.vae = None
        if cfg.eval.vae:
            manifest = getattr(self.loader, "manifest", None)
            scale = manifest.scaling_factor if manifest is not None else None
            self.vae = load_vae(cfg.eval.vae, "cpu", scaling_factor=scale)
            if self.vae.latent_channels != cfg.model.in_channels:
                raise ConfigError(
                    f"eval.vae: the VAE at {cfg.eval.vae} has {self.vae.latent_channels} latent "
                    f"channels, the model {cfg.model.in_channels} input channels"
                )

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Collective: a checkpoint of this step. Training waits only until the state is in host
        memory (and for the previous save, if still writing); see arflow.checkpoint.manager."""
        t0 = time.perf_counter()
        ema = self.ema_model()  # collective; rank 0 writes it
        url = self.ckpt.save(
            self.step,
            stage_state=self.backend.stage_state,
            rank_state=self.state.state_dict(),
            ema=ema.state_dict() if self.info.is_main else None,
            arch=architecture_of(ema),
            config=self.cfg.to_dict(),
        )
        del ema
        seconds = time.perf_counter() - t0
        self.logger.log(self.step, {"checkpoint_seconds": seconds})
        how = "writing in the background" if self.cfg.checkpoint.async_save else "written"
        self.logger.message(f"step {self.step}: checkpoint {url} ({seconds:.2f} s, {how})")
        return url

    def _load(self, found: Found, reshard: bool) -> None:
        """Restore the backend, the EMA and this rank's state from `found` (verified)."""
        try:
            self.backend.load_state(found.local, reshard=reshard, shared=found.shared)
            saved = self.ckpt.load_ema(found)
            local = self.backend.shard_full({n: saved[n] for n in self.ema.shadow})
            with torch.no_grad():
                for name, shadow in self.ema.shadow.items():
                    local_shard(shadow).copy_(local_shard(local[name]))
            same_layout = found.meta["world_size"] == self.info.world_size
            rank = self.info.rank if same_layout else 0  # another world size: any old rank's
            self.state.load_state_dict(self.ckpt.load_rank_state(found, rank), same_layout)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"loading checkpoint {found.url} (step {found.step}) failed: {err}"
            ) from err
        finally:
            found.release()

    # -------------------------------------------------------------------- EMA sampling
    def full_model(self, tensors: dict[str, torch.Tensor]) -> ARFlow:
        """A plain (unsharded) fp32 model holding `tensors` (laid out like the backend's master
        weights), on every rank; collective. Built for the call and dropped by the caller, so no
        rank keeps a full copy between evaluations; the module is built on the meta device and
        takes the gathered tensors as its parameters (no second copy)."""
        full = self.backend.gather_full(tensors)
        full.update({n: t.to(self.info.device) for n, t in self._frozen.items()})
        with torch.device("meta"):
            model = ARFlow(**self.cfg.model.architecture())
        model.load_state_dict(full, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def ema_model(self) -> ARFlow:
        return self.full_model(self.ema.shadow)

    def evaluate(self) -> None:
        """EMA sample grid (rank 0 samples) and, when due, FID / IS (all ranks). The gathered EMA
        model and the VAE's device copy exist for this call only."""
        fid_due = self._due(self.cfg.eval.every)
        model = self.ema_model()  # collective: every rank takes part in the gather
        if not (self.info.is_main or fid_due):
            model = None  # the grid is rank 0's: the other ranks drop their copy while it samples
        vae = self.vae.to(self.info.device) if self.vae is not None and model is not None else None
        try:
            if self.info.is_main:
                self._write_grid(model, vae)
            if fid_due:
                from arflow.eval import evaluate

                result = evaluate(
                    model,
                    self.cfg.eval,
                    device=self.info.device,
                    progress=self.info.is_main,
                    vae=vae,
                )
                self.logger.log(
                    self.step,
                    {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))},
                )
        finally:
            if vae is not None:
                vae.to("cpu")
        dist.barrier()

    def _write_grid(self, model: ARFlow, vae) -> None:
        """`samples.per_class` EMA samples of each of `samples.classes`, one row per class, to
        <run.dir>/samples/ema_step_<step>.png and the logger (decoded by the VAE if latent)."""
        from arflow.flow.samplers import sample

        s = self.cfg.samples
        labels = torch.tensor([c for c in s.classes for _ in range(s.per_class)])
        images = sample(model, labels, list(range(len(labels))), s.sampler)
        if vae is not None and images.shape[1] == vae.latent_channels:
            images = vae.decode(images)
        path = self.run_dir / "samples" / f"ema_step_{self.step:09d}.png"
        save_grid(grid_pixels(images), path, cols=s.per_class)
        caption = f"EMA, step {self.step}, rows = classes {s.classes}"
        self.logger.log_image(self.step, "ema_samples", path, caption)
        self.logger.message(f"step {self.step}: EMA sample grid {path}")

    def export(self) -> None:
        """Rank 0 writes the full fp32 weights, `model.safetensors` (master) and
        `ema.safetensors`, into the run directory as self-describing files (architecture and
        config in their metadata): what `load_pretrained`, sampling, evaluation and conversion
        read without knowing the backend."""
        for name, tensors in (("model", self.backend.master_params()), ("ema", self.ema.shadow)):
            model = self.full_model(tensors)
            if self.info.is_main:
                save_pretrained(
                    model.state_dict(),
                    self.run_dir / f"{name}.safetensors",
                    architecture_of(model),
                    self.cfg.to_dict(),
                )
            del model
        if self.info.is_main:
            self.logger.message(
                f"weights: {self.run_dir / 'model.safetensors'}, {self.run_dir / 'ema.safetensors'}"
            )

    # ------------------------------------------------------------------------------ loop
    def fit(
        self, signals: PreemptionSignals | None = None, failure: FailureWatch | None = None
    ) -> str:
        """Train to `train.steps` (or until preempted); returns "done" or "preempted".

        `signals`: the process's preemption signals (`run` installs them at start-up; without
        them fit installs its own for its duration). `failure`: told of an error first, so the
        other ranks stop before this one cleans up. Every exit stops the data-loader workers."""
        own_signals = signals is None
        if own_signals:
            signals = PreemptionSignals().install()
        try:
            with preserved_rng():  # see _next_batches
                data = iter(self.loader)
            signals.defer()  # from here on a notice means: finish the step, save, exit 0
            outcome = self._train(data, signals)
            self.ckpt.wait()  # the last checkpoint committed before the run counts as ended
            if outcome == "done":
                self.export()
            return outcome
        except BaseException as error:
            if failure is not None:
                failure.report(error)
            raise
        finally:
            # Not left to garbage collection: an exception's traceback keeps the workers'
            # iterator alive, and workers still running at exit would delay it.
            self.loader.close()
            self.profile.close()  # a window the run left early: what was recorded
            if own_signals:
                signals.restore()
            self.logger.close()
            self.ckpt.close()

    def _train(self, data: Iterator, signals: PreemptionSignals) -> str:
        """The loop: one optimizer step, then whatever is due. Between log steps a step reads
        nothing back from the device but the backend's one decision (skip? stop?)."""
        cfg, state = self.cfg, self.state
        window = StepMetrics(self.info.device)
        while state.step < cfg.train.steps:
            self.profile.before_step(state.step + 1)
            lr = lr_at(state.step, cfg.train.steps, cfg.optim)
            with window.waiting_for_data():
                batches = self._next_batches(data)
            result = self.backend.train_step(batches, training_loss, lr, stop=signals.poll)
            self.ckpt.raise_if_failed()  # a background save that failed stops the run here
            state.record(result.skipped)
            if result.skipped:
                self._skipped(result)
            else:
                self.ema.update()
            window.add(result.loss, result.grad_norm, applied=not result.skipped)
            last = state.step == cfg.train.steps
            if self._due(cfg.logging.every) or last:
                self._log(window, lr)
            else:
                self.logger.progress(state.step)
            save = result.stop or self._due(cfg.checkpoint.every) or last
            evaluate = not result.stop and (
                self._due(cfg.samples.every) or self._due(cfg.eval.every) or last
            )
            with window.paused():  # not counted as step time
                if save:
                    with preserved_rng():
                        self.save()
                if evaluate:
                    with preserved_rng():
                        self.evaluate()
                self.profile.after_step(state.step)  # the window's last step writes the trace
            if result.stop:
                name = signals.name or "signal on another rank"
                self.logger.message(f"step {state.step}: {name} received; saved, exiting")
                return "preempted"
        return "done"

    def _next_batches(self, data: Iterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step's `grad_accumulation` micro-batches, on the device."""
        batches = []
        for _ in range(self.grad_accum):
            # Data loading runs outside the training random stream (torch's DataLoader draws
            # its base seed from the global generator when its iterator starts, i.e. at another
            # point of the stream after a resume); the data's own randomness is seeded
            # explicitly, so noise and label dropout resume exactly.
            with preserved_rng():
                x, y = next(data)
            device = self.info.device
            batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        return batches

    def _skipped(self, result: StepResult) -> None:
        """A step skipped for a non-finite loss or gradient: say so (reading this rank's
        values); stop after `train.max_nonfinite_steps` in a row, without saving."""
        s, limit = self.state, self.cfg.train.max_nonfinite_steps
        self.logger.message(
            f"step {s.step}: non-finite loss or gradient on some rank (here: loss "
            f"{result.loss.item():.4g}, grad norm {result.grad_norm.item():.4g}); step skipped "
            f"({s.nonfinite_streak} in a row, {s.skipped_total} in total)"
        )
        if s.nonfinite_streak >= limit:
            raise NonFiniteLossError(
                f"{s.nonfinite_streak} consecutive non-finite steps (limit "
                f"train.max_nonfinite_steps = {limit}) at step {s.step}; stopping without "
                f"saving, the last good checkpoint in {self.cfg.checkpoint_dir} is untouched"
            )

    def _log(self, window: StepMetrics, lr: float) -> None:
        """Collective: the window's metrics, reduced over ranks, to metrics.jsonl / TensorBoard
        / wandb and the progress bar."""
        m = window.read(self.loader.bad_samples)
        images = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        images_per_s = images / m["step_time_s"]
        achieved = self.flops_per_image * images_per_s / self.info.world_size  # per device
        metrics = {
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "lr": lr,
            "images_per_s": images_per_s,
            "tokens_per_s": images_per_s * self.tokens_per_image,
            "step_time_s": m["step_time_s"],
            "data_wait_fraction": m["data_wait_fraction"],
            "tflops_per_device": achieved / 1e12,
            "peak_memory_gb": peak_memory_gb(self.info.device),
            "skipped_steps": self.state.skipped_total,
            "data_bad_samples": m["data_bad_samples"],  # world sum
        }
        postfix = {
            "loss": f"{m['loss']:.4f}",
            "img/s": f"{images_per_s:.1f}",
            "wait": f"{m['data_wait_fraction']:.0%}",
        }
        peak = self._peak_flops()
        if peak is not None:
            metrics["mfu"] = achieved / peak
            postfix["mfu"] = f"{metrics['mfu']:.1%}"
        self.logger.log(self.step, metrics)
        self.logger.progress(self.step, postfix)

    def _peak_flops(self) -> float | None:
        """Peak FLOP/s of one device for MFU: `logging.peak_tflops`, else the CUDA device's
        from its name; None (no MFU) on a CPU or an unlisted device."""
        if self.cfg.logging.peak_tflops is not None:
            return self.cfg.logging.peak_tflops * 1e12
        if self.info.device.type == "cuda":
            name = torch.cuda.get_device_name(self.info.device)
            return peak_flops(name, self.backend.precision)
        return None

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0


def run(
    cfg: Config,
    resume: str | None = None,
    overwrite: bool = False,
    signals: PreemptionSignals | None = None,
) -> str:
    """Join the process group, train, leave. `resume`: None, "auto" or a checkpoint URL;
    `overwrite`: start afresh in a checkpoint.dir that holds another run's checkpoints,
    deleting them (without it such a directory is refused). `signals`: preemption signals
    installed by the launcher before its imports (else here).

    A fatal error on any rank ends every rank within seconds (arflow.distributed.failure);
    SIGTERM / SIGUSR1 during start-up exits at once, in the loop after a save (see
    arflow.utils.signals)."""
    own_signals = signals is None
    if own_signals:
        signals = PreemptionSignals().install()
    try:
        info = init_distributed(cfg.parallel.device, cfg.parallel.collective_timeout_s)
        failure = FailureWatch(info).start()
        try:
            outcome = Trainer(cfg, info, resume, overwrite).fit(signals, failure)
        except BaseException as error:
            failure.report(error)
            # No barrier: the other ranks are stopping or gone; just release the group.
            dist.destroy_process_group()
            raise
        failure.stop()
        shutdown()
        return outcome
    finally:
        if own_signals:
            signals.restore()
