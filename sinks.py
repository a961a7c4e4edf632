"""The logging sinks: TensorBoard and W&B behind one small interface.

Sinks(...) opens both (rank 0 only); scalars() is the per-step/per-epoch history, figure(),
table(), and finish(results, headline) put one-off results where they belong: a short headline
in TensorBoard's HParams, everything in W&B's summary. W&B trouble (offline, not logged in,
any exception) falls back to offline, then off, with one warning; it never stops a run.
log_tables() writes tables that belong to no single run (a study's grid).
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Any, Callable

from files import cannot_write, shown_path

# What a run's HParams metrics show when the script names none: the numbers a reader compares.
HEADLINE = ('test_acc', 'test_loss', 'best_val_acc', 'best_epoch', 'epochs_run', 'train_seconds', 'num_params')
MAX_HEADLINE = 8  # each HParams metric is a one-dot chart in TensorBoard's Time Series
# Time Series sorts tag groups by code point and opens the first two: train/ and val/ (the curves) must come first,
# so figures and the HParams metrics sort after 'val' ('~' after every letter). Names in docs/usage.md, "Logs".
FIGURES, RESULTS = 'visuals', '~results'


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Sinks:
    """TensorBoard (in `folder`) and W&B (id wandb_id, files in `folder`/wandb) for one run."""

    def __init__(self, folder: str, config: dict, exercise: str, name: str, wandb_id: str,
                 tags: list[str], start_step: int, quiet: bool, provenance: dict):
        from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import
        _quiet_tensorboard_thread()
        self.folder, self.config = folder, config
        self.tb = SummaryWriter(folder, purge_step=start_step + 1)  # drop epochs a killed run logged twice
        self.step = start_step  # the highest step logged: W&B drops any row logged below it
        self._extra('config text', lambda tb: tb.add_text('config', markdown_table(
            [{'key': k, 'value': json.dumps(v)} for k, v in config.items()]), start_step))
        self.wandb = _init_wandb(config, exercise, name, wandb_id, tags, folder, quiet, provenance)

    # -- the history ------------------------------------------------------------------------------

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if step < self.step:  # W&B would drop the row ("less than the current step"): a bug, say so
            print(f"warning: {sorted(metrics)} logged at step {step} after step {self.step}; W&B ignores them",
                  flush=True)
        self.step = max(self.step, step)
        with self._tensorboard():
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        self._wandb('log', lambda w: w.log(metrics, step=step))

    def figure(self, name: str, fig, path: str, step: int | None = None) -> None:
        """fig to TensorBoard, saved as `path` (PNG), and that PNG to W&B."""
        from files import save_figure
        step = self.step if step is None else step  # the current step: a W&B log without one advances it
        self.step = max(self.step, step)
        with self._tensorboard():
            self.tb.add_figure(f'{FIGURES}/{name}', fig, step, close=False)
        save_figure(fig, path)

        def send(w):
            import wandb
            w.log({f'{FIGURES}/{name}': wandb.Image(path)}, step=self.step)
        self._wandb(f'figure {name}', send)

    # -- one-off results --------------------------------------------------------------------------

    def table(self, name: str, rows: list[dict]) -> None:
        """A results table (one dict per row): TensorBoard text, a wandb.Table."""
        self._extra(f'table {name}', lambda tb: tb.add_text(name, markdown_table(rows), self.step))
        self._wandb(f'table {name}', lambda w: w.log({name: wandb_table(rows)}, step=self.step))

    def summary(self, values: dict) -> None:
        """One-off values to W&B's summary (not its history)."""
        flat = flat_results(values)
        self._wandb('summary', lambda w: w.summary.update(flat))

    def finish(self, results: dict | None, headline: list[str] | None, provenance: dict | None) -> None:
        """HParams (config + headline metrics), W&B summary (every result) and final provenance; close."""
        flat = flat_results(results or {})
        if self.tb is not None:
            if results:
                self._extra('hparams', lambda tb: self._hparams(tb, flat, headline))
            with self._tensorboard():
                self.tb.close()
            self.tb = None
        if results:
            self._wandb('summary', lambda w: w.summary.update(flat))
        if provenance:
            self._wandb('provenance', lambda w: w.config.update({'provenance': provenance}, allow_val_change=True))
        self._wandb('finish', lambda w: w.finish())
        self.wandb = None

    def _hparams(self, tb, flat: dict, headline: list[str] | None) -> None:
        """TensorBoard's HParams tab: the config as hparams (lists and dicts as JSON text), the
        headline results as metrics (scalars tagged ~results/<key>, at the last step)."""
        from torch.utils.tensorboard.summary import hparams
        params = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in self.config.items()}
        keys = [k for k in (HEADLINE if headline is None else headline) if k in flat][:MAX_HEADLINE]
        metrics = {f'{RESULTS}/{k}': flat[k] for k in keys
                   if isinstance(flat[k], (int, float)) and not isinstance(flat[k], bool)}
        # no experiment summary: TensorBoard then builds the table from every run's hparams and
        # scalars, so runs of different exercises (different keys) sit in one logdir side by side
        _, start_info, end_info = hparams(params, metrics)
        tb.file_writer.add_summary(start_info)
        for k, v in metrics.items():
            tb.add_scalar(k, v, self.step)
        tb.file_writer.add_summary(end_info)

    # -- guards -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tensorboard(self):
        """A TensorBoard write the disk refuses (its writer thread fails; the next call raises) -> one line."""
        try:
            yield
        except OSError as e:
            self.tb = None  # closing it would raise the same error again
            raise cannot_write(f"TensorBoard events in {self.folder}", e) from None

    def _extra(self, what: str, call: Callable[[Any], Any]) -> None:
        """call(SummaryWriter), guarded: an extra TensorBoard record never costs the run."""
        try:
            call(self.tb)
        except Exception as e:  # noqa: BLE001 - logging trouble never stops a run
            print(f"warning: TensorBoard {what} failed ({type(e).__name__}: {e}); the run goes on", flush=True)

    def _wandb(self, what: str, call: Callable[[Any], Any]) -> None:
        """call(wandb_run), guarded: the first failure switches W&B off for this run, with one warning."""
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as e:  # noqa: BLE001 - W&B must never cost the run
            print(f"warning: W&B {what} failed ({_first_line(e)}); "
                  f"W&B is off for the rest of this run, TensorBoard and checkpoints go on", flush=True)
            self.wandb = None


def _init_wandb(config: dict, exercise: str, name: str, wandb_id: str, tags: list[str], folder: str,
                quiet: bool, provenance: dict):
    """A W&B run, falling back to offline, then to none. W&B's own console output only with
    config['wandb_verbose']; one line of ours instead."""
    mode = config['wandb']
    if mode == 'off':
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; W&B logging is off")
        return None
    verbose = config.get('wandb_verbose', False)
    for m in [mode, 'offline'] if mode == 'online' else [mode]:
        try:
            run = wandb.init(project=config['wandb_project'], group=exercise, name=name, id=wandb_id,
                             resume='allow', tags=tags, config={**config, 'provenance': provenance},  # final one at finish
                             dir=folder, mode=m, settings=wandb.Settings(
                                 init_timeout=60, console='off', silent=not verbose, show_info=verbose))
        except Exception as e:  # noqa: BLE001 - any W&B failure is non-fatal by design
            print(f"W&B {m} init failed ({_first_line(e)})")
            continue
        if not quiet:  # a study cell's caller prints its one line
            print(f"W&B offline; upload with: wandb sync {shown_path(os.path.dirname(run.dir))}" if m == 'offline'
                  else f"W&B: {run.url}")
        return run
    print("W&B logging is off for this run")
    return None


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread dies on a full disk with a traceback of its own; its error is
    raised again in the main thread on the next write, where Sinks reports it in one line.
    Installed when the first writer opens (not at import), once."""
    previous = threading.excepthook
    if getattr(previous, 'quiets_tensorboard', False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ == '_AsyncWriterThread' and isinstance(args.exc_value, OSError):
            return
        previous(args)
    hook.quiets_tensorboard = True
    threading.excepthook = hook


# ---------------------------------------------------------------------------------------------
# Tables

def flat_results(results: dict, prefix: str = '') -> dict:
    """results.json's scalars (numbers, booleans, strings) with nested keys joined by '/'; lists
    (curves, per-class values) and the provenance block (in the W&B config) are left out."""
    out = {}
    for k, v in results.items():
        if k == 'provenance' and not prefix:
            continue
        if isinstance(v, dict):
            out.update(flat_results(v, f'{prefix}{k}/'))
        elif isinstance(v, (bool, int, float, str)):
            out[f'{prefix}{k}'] = v
    return out


def table_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _cell(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)


def markdown_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
    lines += ['| ' + ' | '.join(str(_cell(row.get(c, ''))) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)


def wandb_table(rows: list[dict]):
    import wandb
    columns = table_columns(rows)
    return wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows])


def log_tables(exercise: str, config: dict, folder: str, tables: dict[str, list[dict]]) -> None:
    """Tables that belong to no single run (a study's grid) as TensorBoard text in `folder` and as
    wandb.Tables of a short W&B run (job_type 'table', grouped with the exercise's runs). Logging
    trouble prints one warning and never stops the caller."""
    from provenance import provenance
    try:
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(folder, exist_ok=True)
        with SummaryWriter(folder) as tb:
            for name, rows in tables.items():
                tb.add_text(name, markdown_table(rows))
    except Exception as e:  # noqa: BLE001 - logging trouble never stops a run
        print(f"warning: TensorBoard tables failed ({type(e).__name__}: {e})")
    if config.get('wandb', 'off') == 'off':
        return
    try:
        import wandb
        verbose = config.get('wandb_verbose', False)
        run = wandb.init(project=config['wandb_project'], group=exercise, job_type='table',
                         name=f'{os.path.basename(folder)}-{time.strftime("%Y%m%d-%H%M%S")}', dir=folder,
                         mode=config['wandb'], config={**config, 'provenance': provenance()}, reinit='create_new',
                         settings=wandb.Settings(init_timeout=60, console='off', silent=not verbose,
                                                 show_info=verbose))
        try:
            run.log({name: wandb_table(rows) for name, rows in tables.items()}, step=0)
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001
        print(f"warning: W&B tables failed ({_first_line(e)})")
