"""TensorBoard logs of a run, as kohya, musubi-tuner, ai-toolkit and SimpleTuner write them: scalars (loss,
the prior's loss, lr, grad norm, it/s) and the preview grids, under <run>/tensorboard/. Optional: the
`tensorboard` package is an extra; asking for it without the package is a clear error before training.
loss.csv and loss.png are written either way."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import DopsdError

LOG_WITH = ("none", "tensorboard")


class TensorBoardLog:
    def __init__(self, run_dir: Path, start_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DopsdError("--log-with tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or the pack's [tensorboard] extra)") from None
        # purge_step: a resumed run drops what a stopped run logged after its last save
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step or None)

    def step(self, info) -> None:
        """A trainer StepInfo."""
        w, s = self.writer, info.step
        w.add_scalar("loss", info.loss, s)
        w.add_scalar("lr", info.lr, s)
        w.add_scalar("it_per_s", info.it_per_s, s)
        if info.grad_norm is not None:
            w.add_scalar("grad_norm", info.grad_norm, s)
        if info.prior_loss is not None:
            w.add_scalar("prior_loss", info.prior_loss, s)

    def preview(self, step: int, images: torch.Tensor) -> None:
        """Preview samples [N, H, W, 3] in [0, 1], one grid."""
        self.writer.add_images("previews", images.detach().float().clamp(0, 1).cpu(), step, dataformats="NHWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require(kind: str) -> None:
    """Refuse an unknown logger, or TensorBoard without its package, before any work."""
    if kind not in LOG_WITH:
        raise DopsdError(f"unknown --log-with {kind!r}; choose one of {', '.join(LOG_WITH)}")
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise DopsdError("--log-with tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or the pack's [tensorboard] extra)") from None


def open_log(kind: str, run_dir: Path, start_step: int = 0) -> TensorBoardLog | None:
    require(kind)
    return TensorBoardLog(run_dir, start_step) if kind == "tensorboard" else None


def chain(*fns):
    """One callback that calls each of fns (None entries skipped)."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None

    def call(*args):
        for f in fns:
            f(*args)
    return call
