"""The checkpoints of one run: Orbax saves (async, every process writing its own shards, one commit), the
retention policy, and restores that only ever return a checkpoint that was finalized and reads back intact.

Orbax writes each checkpoint to a temporary directory and renames it into place when every process is
done, so a save cut short never shows up as a step. A finalized checkpoint can still be damaged later
(truncated, corrupted, half-deleted); restoring checks each one against the fingerprints saved with it, and
a damaged one is moved to `<dir>/damaged/` (never deleted: it may be worth a look) before the previous one is
tried. Damage visible in the files is found before Orbax reads any (`files`), so it costs one warning. A
checkpoint written by a different model or optimizer is not damage: that is an error to fix.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
from dataclasses import dataclass

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxscale.checkpointing.files import DamagedFiles, check_array_files
from jaxscale.checkpointing.fingerprint import summarize
from jaxscale.checkpointing.metadata import CheckpointMetadata, RunInfo, array_layout, layout_differences
from jaxscale.config import CheckpointConfig
from jaxscale.distributed import any_process, sync_processes
from jaxscale.run_files import absolute, is_url

log = logging.getLogger("jaxscale")

DAMAGED_DIR = "damaged"


class CheckpointError(Exception):
    """A checkpoint problem the user has to decide about; the message says what to do."""


class DamagedCheckpoint(CheckpointError):
    """A finalized checkpoint that does not read back as it was saved."""


@dataclass
class Restored:
    state: object  # the TrainState, laid out as the abstract target asked
    metadata: CheckpointMetadata
    path: epath.Path
    damaged: list[epath.Path]  # newer checkpoints found damaged and moved aside on the way


def retention_policy(config: CheckpointConfig):
    policies = [ocp.checkpoint_managers.LatestN(n=config.keep_last)]
    if config.keep_every:
        policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=config.keep_every))
    return ocp.checkpoint_managers.AnyPreservationPolicy(policies)


def remove_unfinished(directory: epath.Path) -> None:
    """Delete the saves a killed run never finished: Orbax writes step s to '<s>.orbax-checkpoint-tmp...' and
    renames it to '<s>' only when every process is done, so these were never a checkpoint. (Orbax's own
    cleanup runs in a background thread that a quick exit would cut short; this one is done before any
    save.) In a bucket Orbax marks a finished save with a commit_success file instead, and skips those without
    one."""
    if jax.process_index() == 0 and directory.is_dir():
        for path in directory.glob("*.orbax-checkpoint-tmp*"):
            log.info("removing %s: a save that never finished", path)
            path.rmtree()
    sync_processes("jaxscale: unfinished checkpoints removed")


def check_directory(directory: epath.Path) -> None:
    """Refuse now, not at the first save (maybe hours later), a checkpoint directory that is a file or that
    process 0 (the one that creates the directories) cannot write. Only looks (in a bucket, where there are
    no permission bits to look at, process 0 writes and deletes a probe object); every process raises if any
    one found a problem (the processes must call this together)."""
    fix = "set checkpoint.dir (or run_dir) to a directory this user can write"
    if is_url(directory):
        problem = write_problem(directory) if jax.process_index() == 0 else None
        if any_process(problem is not None):
            raise CheckpointError(f"cannot keep checkpoints in {directory}: "
                                  + (f"{problem}; {fix}" if problem else f"another process cannot use it; {fix}"))
        return
    existing = directory  # the directory itself, or its nearest parent that exists (saves create the rest)
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is a file, not a directory; {fix}, or move the file away"
    elif jax.process_index() == 0 and not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user; {fix}"
    if any_process(problem is not None):
        raise CheckpointError(f"cannot keep checkpoints in {directory}: "
                              + (problem or f"another process of the run cannot use it; {fix}"))


def write_problem(directory: epath.Path) -> str | None:
    """Why this process cannot write in `directory`, found by creating and deleting a probe there (a folder on
    a disk; an object in a bucket, where folders are only names); None if it can."""
    probe = directory / f".write-check-{os.getpid()}"
    try:
        if is_url(directory):
            probe.write_text("")
            probe.unlink()
        else:
            probe.mkdir()
            probe.rmdir()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


class CheckpointStore:
    """The checkpoints in one directory. Every process of a run opens it and calls save / restore with the
    others."""

    def __init__(self, directory: epath.Path, config: CheckpointConfig, read_only: bool = False):
        """read_only: only read (an export): nothing is created, cleaned up or deleted, not even the unfinished
        save of a run that is training right now."""
        self.directory = absolute(epath.Path(directory))
        if not read_only:
            check_directory(self.directory)
            remove_unfinished(self.directory)
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # Orbax warns that a read-only manager will not save, which is the point here
            absl.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                enable_async_checkpointing=config.async_save,
                preservation_policy=None if read_only else retention_policy(config),
                create=not read_only, read_only=read_only)
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        finally:
            absl.setLevel(level)
        self._writing: int | None = None  # the step of the save in flight

    def steps(self) -> list[int]:
        """Finalized checkpoints, oldest first."""
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def delete_all(self) -> None:
        for step in self.steps():
            self.manager.delete(step)

    def save(self, step: int, state, run: RunInfo) -> None:
        """Start saving `state` (the result of `step` updates). Returns once the state is copied to host
        memory (the caller may then donate its buffers); the write to disk goes on in the background.
        A write that fails raises CheckpointError, here or from the next save or `wait`."""
        self.wait()  # the previous save first (Orbax would wait too), so that a failure names its own step
        self._check_writable(step)
        fingerprints, finite = summarize(state)
        if not finite:
            newest = self.steps()[-1] if self.steps() else None
            raise CheckpointError(
                f"refusing to save step {step}: the training state holds NaN or Inf values. The newest good "
                f"checkpoint is step {newest} in {self.directory}; rerunning resumes from it (consider "
                f"guards.on_nonfinite=rollback or a lower learning rate)")
        arrays = {path: {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "fingerprint": fingerprint}
                  for (path, fingerprint), leaf in zip(fingerprints.items(), jax.tree.leaves(state))}
        metadata = CheckpointMetadata(**vars(run), step=step, data_position=step, arrays=arrays,
                                      saved_at=datetime.datetime.now(datetime.UTC).isoformat())
        try:
            self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata.to_json())))
        except Exception as e:  # the file system's error, as whichever layer met it raised it
            raise self._write_failed(step, f"{type(e).__name__}: {first_line(e)}") from e
        self._writing = step

    def wait(self) -> None:
        """Until every started save is finalized (committed and visible as a step)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_failed(self._writing, f"{type(e).__name__}: {first_line(e)}") from e
        finally:
            self._writing = None

    def _check_writable(self, step: int) -> None:
        """Orbax creates a save's directory in a background thread; when that fails, the threads waiting for it
        wait out the coordination timeout (minutes) and hold up the process's exit. So process 0, which
        creates the directories, tries first (the processes must call this together)."""
        problem = write_problem(self.directory) if jax.process_index() == 0 else None
        if any_process(problem is not None):
            raise self._write_failed(step, problem or "process 0 of the run cannot write there")

    def _write_failed(self, step: int | None, problem: str) -> CheckpointError:
        """Orbax writes a checkpoint under a temporary name and renames it only when complete, so a failed write
        leaves the finalized checkpoints as they were (and the next run removes the unfinished one)."""
        self.manager.reload()
        steps = self.steps()
        kept = (f"the newest good checkpoint is still step {steps[-1]}" if steps else
                "there is no earlier checkpoint")
        space = "" if is_url(self.directory) else \
            f" (its disk has {shutil.disk_usage(self.directory).free / 1e9:.2f} GB free)"
        return CheckpointError(
            f"writing checkpoint {self.path(step) if step is not None else 'in ' + str(self.directory)} failed: "
            f"{problem}. Nothing saved before was changed: {kept}. Make {self.directory} writable{space}, or set checkpoint.dir to another directory, and rerun the same command "
            f"to continue")

    def read_metadata(self, step: int) -> CheckpointMetadata:
        raw = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        return CheckpointMetadata.from_json(raw)

    def newest_metadata(self) -> CheckpointMetadata | None:
        """The metadata of the newest checkpoint whose metadata reads back; None if there is none."""
        for step in reversed(self.steps()):
            try:
                return self.read_metadata(step)
            except Exception as e:  # any failure to read is damage; restore_newest moves it aside
                log.info("checkpoint %s: metadata unreadable (%s)", self.path(step), first_line(e))
        return None

    def restore(self, step: int, abstract_state) -> Restored:
        """Checkpoint `step`, laid out as `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings:
        each process reads only the pieces its devices hold, so a checkpoint from any mesh restores onto any
        other without gathering the model anywhere), and checked against the fingerprints saved with it.

        Raises DamagedCheckpoint if it does not read back intact, CheckpointError if it belongs to a
        different model or optimizer."""
        try:
            metadata = self.read_metadata(step)
        except Exception as e:  # unreadable metadata is damage, whatever the exception
            raise DamagedCheckpoint(f"metadata unreadable: {type(e).__name__}: {first_line(e)}") from e
        differences = layout_differences(metadata.arrays, array_layout(abstract_state))
        if differences:
            raise CheckpointError(
                f"checkpoint {self.path(step)} was written by a different model or optimizer "
                f"configuration:\n  "
                + "\n  ".join(differences)
                + "\nUse another run_dir, or start over with --set checkpoint.resume=false "
                  "--set checkpoint.overwrite=true")
        try:  # before Orbax reads them: see checkpointing/files.py
            check_array_files(self.path(step) / "state")
        except DamagedFiles as e:
            raise DamagedCheckpoint(f"array files damaged: {e}") from e
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as e:  # missing, truncated or undecodable files all mean damage
            raise DamagedCheckpoint(f"arrays unreadable: {type(e).__name__}: {first_line(e)}") from e
        fingerprints, _ = summarize(state)
        wrong = [path for path, fp in fingerprints.items() if metadata.arrays[path]["fingerprint"] != fp]
        if wrong:
            raise DamagedCheckpoint(f"{len(wrong)} arrays differ from what was saved, e.g. {wrong[0]}")
        return Restored(state, metadata, self.path(step), damaged=[])

    def param_differences(self, step: int, abstract_params) -> list[str]:
        """How the parameters of checkpoint `step` differ from `abstract_params` (shapes, dtypes, names): empty
        when they match."""
        saved = {path: entry for path, entry in self.read_metadata(step).arrays.items() if path.startswith(".params")}
        return layout_differences(saved, {_state_path(path): layout
                                          for path, layout in array_layout({"params": abstract_params}).items()})

    def restore_params(self, step: int, abstract_params) -> dict:
        """Only the parameters of checkpoint `step` (the state's `params`; no optimizer state is read), laid out
        as `abstract_params` and checked against the fingerprints saved with them. Raises CheckpointError where
        they differ from this model's, DamagedCheckpoint where they do not read back intact."""
        differences = self.param_differences(step, abstract_params)
        if differences:
            raise CheckpointError(f"the parameters of checkpoint {self.path(step)} differ from this model's:\n  "
                                  + "\n  ".join(differences))
        target = {"params": abstract_params}
        try:
            check_array_files(self.path(step) / "state")
            with ocp.PyTreeCheckpointer() as reader:
                params = reader.restore(self.path(step) / "state", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True))["params"]
        except Exception as e:  # damaged files, missing or undecodable arrays
            raise DamagedCheckpoint(f"parameters unreadable: {type(e).__name__}: {first_line(e)}") from e
        saved = self.read_metadata(step).arrays
        fingerprints, _ = summarize({"params": params})
        wrong = [path for path, fp in fingerprints.items() if saved[_state_path(path)]["fingerprint"] != fp]
        if wrong:
            raise DamagedCheckpoint(f"{len(wrong)} parameters differ from what was saved, e.g. {wrong[0]}")
        return params

    def restore_newest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that reads back intact (see `restore`). Damaged ones on the way are moved
        aside with a warning naming them. None if there are no checkpoints; an error if there are some but
        none is usable."""
        damaged = []
        for step in reversed(self.steps()):
            problem = None
            try:
                restored = self.restore(step, abstract_state)
            except DamagedCheckpoint as e:
                problem = str(e)
            if not any_process(problem is not None):  # a checkpoint is good only if every process read it
                restored.damaged = damaged
                return restored
            moved_to = self._move_aside(step)
            log.warning("checkpoint %s is damaged (%s); moved it to %s and trying the previous one",
                        self.path(step), problem or "damaged as read by another process", moved_to)
            damaged.append(moved_to)
        if damaged:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: all {len(damaged)} were damaged and are now in "
                f"{self.directory / DAMAGED_DIR}. To start the run over, add --set checkpoint.resume=false")
        return None

    def _move_aside(self, step: int) -> epath.Path:
        target = self.directory / DAMAGED_DIR / str(step)
        suffix = 1
        while target.exists():
            target = self.directory / DAMAGED_DIR / f"{step}-{suffix}"
            suffix += 1
        sync_processes(f"jaxscale: moving checkpoint {step} aside")  # every process has chosen the target
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            self.path(step).rename(target)
        sync_processes(f"jaxscale: moved checkpoint {step} aside")
        self.manager.reload()
        return target

    def close(self) -> None:
        """Waits for saves in flight, then releases the manager."""
        self.manager.close()


def _state_path(path: str) -> str:
    """A leaf path of {"params": ...} as the saved state names it (the TrainState's attribute)."""
    return ".params" + path.removeprefix("['params']")


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
