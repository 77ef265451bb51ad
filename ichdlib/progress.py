"""Training progress that fits its place.

Headless (``ichd run``, papermill, scripts): one compact line per epoch,
``<model> fold <k> epoch <e>/<n>  train loss ..  val wLL ..  <img/s>  <s>``, and no progress bars, so that a
full schedule (5 folds x 4 backbones x tens of epochs) still gives a report a person can scroll.

In JupyterLab: tqdm.auto widget bars (an epoch bar reset for each fold and a batch bar reset every epoch, reused
rather than stacked) and a training curve that updates in place while a fold trains.

The training loops call :class:`TrainingProgress`; nothing here knows about models.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from ichdlib.nb import interactive

T = TypeVar("T")


def live() -> bool:
    """True where widget bars and live figures make sense: a live Jupyter front end (see ``nb.interactive``)."""

    return interactive()


def epoch_line(model: str, fold: int | str, epoch: int, epochs: int, train_loss: float,
               val_wll: float | None = None, images_per_s: float | None = None, seconds: float | None = None,
               best: bool = False) -> str:
    """One compact, fixed-width progress line (``epoch`` is 0-based; shown 1-based as ``e/n``)."""
    w = len(str(epochs))
    parts = [f"{model} fold {fold} epoch {epoch + 1:>{w}}/{epochs}", f"train loss {train_loss:.4f}"]
    if val_wll is not None:
        parts.append(f"val wLL {val_wll:.4f}{' *' if best else '  '}")
    if images_per_s is not None:
        parts.append(f"{images_per_s:>6.0f} img/s")
    if seconds is not None:
        parts.append(f"{seconds:>5.1f} s")
    return "  ".join(parts)


class TrainingProgress:
    """Progress of one model's folds: call :meth:`fold`, then per epoch :meth:`batches` and :meth:`epoch`.

    ``live=None`` decides by :func:`live`. Headless, each epoch prints one :func:`epoch_line` to ``stream``
    (stdout by default), ``*`` marking a new best validation loss. Live, an epoch bar and a batch bar
    (tqdm.auto, reset rather than recreated), and a figure of train loss / val wLL per fold updated in place.
    """

    def __init__(self, model: str, *, live: bool | None = None, stream: TextIO | None = None,
                 curve: bool = True) -> None:
        self.model = model
        self.live = globals()["live"]() if live is None else bool(live)
        self.stream = stream
        self.curve = curve and self.live
        self.history: dict[Any, list[tuple[int, float, float | None]]] = {}
        self._fold: Any = None
        self._epochs = 0
        self._best: float | None = None
        self._epoch_bar: Any = None
        self._batch_bar: Any = None
        self._fig: Any = None
        self._handle: Any = None
        self._t0 = time.perf_counter()

    # -- per fold ------------------------------------------------------------------------------------
    def fold(self, fold: int | str, epochs: int, start: int = 0, best: float | None = None) -> None:
        """A fold starts (or resumes at ``start`` with its best validation loss so far)."""
        self._fold, self._epochs, self._best = fold, epochs, best
        self.history.setdefault(fold, [])
        if self.live:
            from tqdm.auto import tqdm  # noqa: PLC0415  (progress bars load only when shown)

            if self._epoch_bar is None:
                self._epoch_bar = tqdm(total=epochs, initial=start, desc=f"{self.model} fold {fold}", unit="epoch")
            else:  # one epoch bar reused fold after fold: bars stay together above the live curve
                self._epoch_bar.reset(total=epochs)
                self._epoch_bar.update(start)
                self._epoch_bar.set_description(f"{self.model} fold {fold}")
        elif start:
            self._print(f"{self.model} fold {fold}: resuming at epoch {start + 1}/{epochs}")

    def batches(self, iterable: Iterable[T], total: int | None = None) -> Iterator[T]:
        """Iterate one epoch's batches; live, through a batch bar that is reset (not recreated) each epoch."""
        if not self.live:
            yield from iterable
            return
        from tqdm.auto import tqdm  # noqa: PLC0415  (progress bars load only when shown)

        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        if self._batch_bar is None:
            self._batch_bar = tqdm(total=total, desc="batches", leave=False, unit="batch", mininterval=0.5)
        else:
            self._batch_bar.reset(total=total)
        for item in iterable:
            yield item
            self._batch_bar.update()

    def epoch(self, epoch: int, train_loss: float, val_wll: float | None = None,
              images_per_s: float | None = None, seconds: float | None = None) -> str:
        """Report a finished epoch (0-based); returns the line (printed headless)."""
        best = val_wll is not None and (self._best is None or val_wll < self._best)
        if best:
            self._best = val_wll
        self.history.setdefault(self._fold, []).append((epoch, train_loss, val_wll))
        line = epoch_line(self.model, self._fold, epoch, self._epochs, train_loss, val_wll, images_per_s,
                          seconds, best=best)
        if self.live:
            if self._epoch_bar is not None:
                post = {"loss": f"{train_loss:.4f}"}
                if val_wll is not None:
                    post["val_wLL"] = f"{val_wll:.4f}"
                if images_per_s is not None:
                    post["img/s"] = f"{images_per_s:.0f}"
                self._epoch_bar.set_postfix(post, refresh=False)
                self._epoch_bar.update()
            if self.curve:
                self._draw()
        else:
            self._print(line)
        return line

    def close(self) -> None:
        """Close the bars (the live curve stays as the cell's output)."""
        for bar in (self._batch_bar, self._epoch_bar):
            if bar is not None:
                bar.close()
        self._batch_bar = self._epoch_bar = None
        self._fig = None  # not a pyplot figure: nothing to close, and nothing the inline backend shows again

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def figure(self) -> Any:
        """The training curve so far (train loss and val wLL by epoch, one colour per fold)."""
        from matplotlib.figure import Figure  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

        fig = self._fig or Figure(figsize=(9, 2.8), dpi=90)
        fig.clear()
        ax_tr, ax_va = fig.subplots(1, 2)
        for i, (fold, rows) in enumerate(self.history.items()):
            if not rows:
                continue
            e = [r[0] + 1 for r in rows]
            colour = f"C{i % 10}"
            ax_tr.plot(e, [r[1] for r in rows], ".-", color=colour, label=f"fold {fold}")
            val = [(x, r[2]) for x, r in zip(e, rows, strict=True) if r[2] is not None]
            if val:
                ax_va.plot(*zip(*val, strict=True), ".-", color=colour, label=f"fold {fold}")
        ax_tr.set(xlabel="epoch", ylabel="train loss", title=f"{self.model}: training loss")
        ax_va.set(xlabel="epoch", ylabel="weighted log loss", title="validation (competition metric)")
        from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  (plotting and notebook libraries load only to draw)

        for ax in (ax_tr, ax_va):
            ax.set_xlim(0.5, max(self._epochs, 1) + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        self._fig = fig
        return fig

    def _draw(self) -> None:
        """Show the curve as PNG in one output that is updated in place (whatever matplotlib backend is active)."""

        from IPython.display import Image, display  # noqa: PLC0415  (plotting and notebook libraries load only to draw)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

        fig = self.figure()
        buf = io.BytesIO()
        FigureCanvasAgg(fig).print_png(buf)
        img = Image(data=buf.getvalue(), format="png")
        if self._handle is None:
            self._handle = display(img, display_id=True)
        else:
            self._handle.update(img)


def track(iterable: Iterable[T], desc: str | None = None, total: int | None = None, **kw: Any) -> Iterable[T]:
    """A tqdm.auto bar around ``iterable`` in a live front end; the bare iterable headless or without ``desc``."""
    if desc is None or not live():
        return iterable
    from tqdm.auto import tqdm  # noqa: PLC0415  (progress bars load only when shown)

    return tqdm(iterable, desc=desc, total=total, leave=False, **kw)
