"""A run: its folder (rundir.py), its device (device.py) and its logging sinks (sinks.py), composed.

    run = Run('exercise_1_1', config, overrides, name='mlp')  # checks everything, writes nothing
    ...load data, build the model...
    run.start()          # runs/<exercise>/<name>/: config.json, command.txt, TensorBoard, W&B
    run.log({...}, step); run.log_figure('curves', fig); run.finish(results, headline=[...])

Resume rules and run folders: docs/usage.md. Checkpoints: checkpoint.py. Training: training.py.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import Callable

import torch

import checkpoint
from checkpoint import Checkpoint
from config import UserError, check_run_name
from device import from_main, init_distributed, pick_device
from files import copy_file, shown_path
from provenance import git_state, now, provenance
from rundir import (RunFolder, check_deletable, check_exercise, check_runs_dir, find_auto, has_run, holder,
                    release, resume_folder, resumed_config)
from sinks import Sinks


class Run:
    """runs/<exercise>/<run_name>/ with config.json, command.txt, checkpoints/, TensorBoard and W&B.

    The constructor only checks and decides (fresh or resumed, which folder, which config);
    start() creates the folder and the sinks, so a run refused or failing before it starts leaves
    nothing behind. With config['resume'] (a path, or 'auto') the run continues in the
    checkpoint's folder with the checkpoint's config; an override that differs is applied when it
    is in config.MAY_CHANGE_ON_RESUME or `may_change`, and refused otherwise.
    """

    def __init__(self, exercise: str, config: dict, overrides: dict | None = None,
                 name: str = 'run', tags: list[str] | None = None, may_change: tuple[str, ...] = (),
                 quiet: bool = False):
        self.exercise, self.tags, self.quiet = exercise, tags or [], quiet  # quiet: a study cell, one line
        self.started_at = now()  # provenance: when this run (or this resumed session) began
        git_state()  # ... and the code it runs: read once per process, before anyone edits the tree
        overrides = overrides or {}
        self.defaults = {k: v for k, v in config.items() if k not in overrides}  # the console's config line
        self.rank, self.world = init_distributed(pick_device(config['device']))
        check_runs_dir(config['runs_dir'], exercise)
        config = dict(config)  # resume='auto' resolves into our copy, not the caller's dict
        if config['resume'] == 'auto':
            found, line = find_auto(exercise, config, name)
            self._say(line)
            config['resume'] = from_main(found)
        self.checkpoint: Checkpoint | None = checkpoint.load(config['resume']) if config['resume'] else None
        if self.checkpoint is not None:
            check_exercise(self.checkpoint, exercise)
            self.folder = resume_folder(self.checkpoint, exercise, config['runs_dir'], overrides)
            config = resumed_config(self.checkpoint, config, overrides, set(may_change), self.folder.dir)
            self.wandb_id = self.checkpoint.wandb_id or _new_wandb_id()
            if not self.folder.imported:  # claimed now, before any work: one process trains a run
                self._on_main(self.folder.claim_resumed)
        else:
            self.folder = self._fresh_folder(config, name)
            self.wandb_id = from_main(_new_wandb_id())  # a fresh run never continues an old W&B run
        self.dir = self.folder.dir
        self.name = config['run_name'] = os.path.basename(self.dir)
        self.config = config
        self.device = pick_device(config['device'])
        torch.manual_seed(config['seed'])  # before the script builds its model
        self.started = self.discarding = False
        self.sinks: Sinks | None = None
        self.notes: dict = {}  # facts results.json records beside the metrics (training: selection, diverged)

    def _fresh_folder(self, config: dict, name: str) -> RunFolder:
        run_name = from_main(config['run_name'] or f"{name}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_run_name(run_name)
        folder = RunFolder(os.path.abspath(os.path.join(config['runs_dir'], self.exercise, run_name)))
        self._on_main(folder.recover_replaced)
        busy = from_main(holder(folder.dir) if self.rank == 0 else '')
        if busy:
            raise UserError(f"run {folder.dir} is in use by {busy}: let it finish or stop it first, "
                            f"or choose another --run_name")
        taken = from_main(has_run(folder.dir))  # rank 0's view; start() claims the folder and checks again
        if taken and config.get('overwrite'):
            check_deletable(folder.dir, folder.parent)  # before any work, and before touching it
        if taken and not config.get('overwrite'):
            last = os.path.join(folder.dir, 'checkpoints', 'last.pt')
            how = f"resume it with --resume {last}" if os.path.exists(last) else "delete it"
            raise UserError(f"run {folder.dir} already exists: {how}, choose another --run_name, "
                            f"or pass --overwrite True to replace it")
        return folder

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def _on_main(self, act: Callable[[], None]) -> None:
        """act() on rank 0 alone; a UserError it raises is raised on every rank, so all of them stop."""
        error = ''
        if self.rank == 0:
            try:
                act()
            except UserError as e:
                error = str(e)
        error = from_main(error)
        if error:
            raise UserError(error)

    # -- the folder -------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def start(self) -> None:
        """Claim and fill the folder (config.json, command.txt); open TensorBoard and W&B. Rank 0 only."""
        if self.started:
            return
        self.started = True
        if self.rank != 0:  # under torchrun, rank 0 alone writes
            return
        fresh = self.checkpoint is None
        if fresh or self.folder.imported:  # an old run (overwrite) is kept aside, not deleted
            self.folder.claim_new(bool(self.config.get('overwrite')))
        self.folder.write_config(self.config)
        if not self.quiet:
            print(f"run {shown_path(self.dir)} on {self.device}" + ('' if fresh else f" (resuming {self.config['resume']})"))
            changed = {k: v for k, v in self.config.items()
                       if k not in ('resume', 'run_name', 'runs_dir') and self.defaults.get(k, object()) != v}
            if changed:  # the full config is in config.json and --help
                print('config ' + ' '.join(f'{k}={v!r}' for k, v in changed.items()))
        start = len(self.checkpoint.history) if self.checkpoint else 0
        self.sinks = Sinks(self.dir, self.config, self.exercise, self.name, self.wandb_id, self.tags, start,
                           self.quiet, self.provenance())

    def save_checkpoint(self, name: str, ckpt: dict) -> None:
        """checkpoints/<name> (rank 0). The first last.pt ends an --overwrite replacement: the old run goes."""
        if self.rank != 0:
            return
        os.makedirs(self.path('checkpoints'), exist_ok=True)
        checkpoint.save(self.path('checkpoints', name), ckpt)
        if name == 'last.pt':
            self.folder.settle(keep_new=True)

    def discard(self) -> None:
        """Undo start() for a fresh run that failed before its first checkpoint: no stub folder (an
        empty run in TensorBoard) is left, and an old run it was replacing comes back."""
        if (not self.started or self.rank != 0 or self.checkpoint is not None
                or os.path.exists(self.path('checkpoints', 'last.pt'))):
            return
        self.discarding = True  # finish() must not settle the replacement in the new run's favour
        self.finish()
        self.folder.remove()

    # -- logging ----------------------------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Per-step or per-epoch values: the scalar history. One-off results go to finish() or summary()."""
        self.start()
        if self.sinks is not None:  # None: not rank 0
            self.sinks.scalars(metrics, step)

    def log_figure(self, name: str, fig, step: int | None = None) -> str:
        """Save as <run>/<name>.png, and send to TensorBoard and W&B. Returns the PNG path."""
        self.start()
        path = self.path(f'{name}.png')
        if self.sinks is None:  # not rank 0: nothing is written
            import matplotlib.pyplot as plt
            plt.close(fig)
            return path
        self.sinks.figure(name, fig, path, step)
        return path

    def log_figures(self, figures: dict, copy_to: str | None = None, prefix: str = '') -> list[str]:
        """log_figure each; with copy_to (the docs' assets/, an explicit opt-in) also copy each
        PNG there as <prefix><name>.png. Returns every path written."""
        paths = []
        for name, fig in figures.items():
            paths.append(self.log_figure(name, fig))
            if copy_to and self.rank == 0:
                os.makedirs(copy_to, exist_ok=True)
                paths.append(copy_file(paths[-1], os.path.join(copy_to, f'{prefix}{name}.png')))
        return paths

    def log_table(self, name: str, rows: list[dict]) -> None:
        """A results table (one dict per row): W&B as a wandb.Table, TensorBoard as text."""
        self.start()
        if self.sinks is not None:
            self.sinks.table(name, rows)

    def summary(self, values: dict) -> None:
        """One-off results (nested dicts flattened to a/b keys) to W&B's summary, not its history."""
        self.start()
        if self.sinks is not None:
            self.sinks.summary(values)

    def finish(self, results: dict | None = None, headline: list[str] | None = None) -> None:
        """Close TensorBoard and W&B. With the run's results (results.json's dict): W&B's summary gets
        every result, TensorBoard's HParams the config and the `headline` results (default
        sinks.HEADLINE, at most 8: each is a chart of one dot), W&B's config the final provenance."""
        if not self.started:
            return
        if self.sinks is not None:
            self.sinks.finish(results, headline, (results or {}).get('provenance'))
            self.sinks = None
        if not self.discarding:
            self.folder.settle(keep_new=True)  # the run ended well (stopped after a checkpoint, or finished)
            release(self.dir)

    def provenance(self, data=None) -> dict:
        return provenance(self.device, self.world, data, self.started_at)


def _new_wandb_id() -> str:
    return secrets.token_hex(4)  # 8 hex characters, as W&B's own ids
