"""``skullrec federate``: federated training on Flower's deployment engine, started on 127.0.0.1.

One command starts what a real federation runs on several machines, here as local processes:

    flower-superlink  (the server's broker, --insecure on 127.0.0.1 only)
    flower-supernode  x N, one per site, --node-config "site='NAME' data-root='SITE_FOLDER'"
    flwr run skullrec/federated/app   (submits the ServerApp/ClientApp; --stream prints the server's log)

and stops them when the run ends. Why the deployment engine and not Flower's simulation engine: the
simulation engine needs Ray (``flwr[simulation]``), a large dependency that starts a cluster of worker
processes and is unreliable on a 2-core CI machine; the deployment engine is plain ``flwr`` and is
exactly what real sites run, so the development run and a hospital deployment share one code path.

The run folder (``out``) is described in skullrec.federated.server_app; Flower's own files (its
config, logs of the SuperLink and every SuperNode) go to ``out/.flwr`` and ``out/logs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import Config, _from_dict, apply_overrides, check_ranges, dump_config, load_config, read_yaml
from ..errors import ConfigError, InputError
from ..io import atomic_write_text
from .server_app import read_metrics, read_state
from .sites import check_sites

APP_DIR = Path(__file__).resolve().parent / "app"


@dataclass
class FederateConfig:
    """A federation: sites, rounds, strategy, and the training config every site trains with."""

    name: str = "federate"
    out: str = "runs/federate"
    train_config: str = "configs/baseline.yaml"  # method, model, lr, batch size of the local training
    train_set: list[str] = field(default_factory=list)  # --set overrides of the training config
    sites: list[str] = field(default_factory=list)  # site data-set folders (skullrec.federated.sites)
    rounds: int = 20
    local_epochs: int = 1
    strategy: Literal["fedavg", "fedavg-swa"] = "fedavg"
    swa_start: int | None = None  # first round averaged by fedavg-swa (default: 75 % of the rounds, as FedSAM)
    swa_cycle: int = 1  # fedavg-swa: rounds per cyclic-lr cycle; SWA collects each cycle's last round (1: constant lr)
    swa_lr: float | None = None  # fedavg-swa: the sites' lr at the end of a cycle (default: train lr / 100)
    min_sites: int | None = None  # sites that must answer for a round to commit (default: all)
    round_timeout: float = 3600.0  # seconds the server waits for the sites' replies in one round
    checkpoint_rounds: list[int] = field(default_factory=list)  # keep round_NNN.safetensors of these rounds
    evaluate: bool = True  # after each round, every site scores the global model on its eval_site cases
    # A real federation: the name of a SuperLink connection in Flower's config ($FLWR_HOME/config.toml,
    # default ~/.flwr/config.toml). Then nothing is started here and ``sites`` are the site names the
    # hospitals' SuperNodes were started with (--node-config "site='NAME' data-root='...'"), not folders.
    superlink: str | None = None


class FederationFailed(RuntimeError):
    """The federation stopped before its last round (one line: which round, which sites); CLI exit code 1."""


def load_federation_config(path: Path | None, overrides: list[str], sites: list[Path]) -> FederateConfig:
    """Read, override and validate a federation YAML; ``sites`` (from the command line) replace the file's."""
    values = read_yaml(path, overrides, what="federation config")
    if sites:
        values["sites"] = [str(s) for s in sites]
    label = f"{path}: " if path is not None else ""
    try:
        fed: FederateConfig = _from_dict(FederateConfig, values)
    except ConfigError as exc:
        raise ConfigError(f"{label}{exc}") from None
    checks = [
        ("rounds", fed.rounds >= 1, "must be >= 1"),
        ("local_epochs", fed.local_epochs >= 1, "must be >= 1"),
        ("round_timeout", fed.round_timeout > 0, "must be > 0"),
        ("swa_start", fed.swa_start is None or 1 <= fed.swa_start <= fed.rounds, "must lie in 1..rounds"),
        ("swa_cycle", fed.swa_cycle >= 1, "must be >= 1"),
        ("swa_lr", fed.swa_lr is None or fed.swa_lr > 0, "must be > 0"),
        ("min_sites", fed.min_sites is None or 1 <= fed.min_sites <= max(len(fed.sites), 1), "must lie in 1..number of sites"),
        ("checkpoint_rounds", all(1 <= r <= fed.rounds for r in fed.checkpoint_rounds), "must lie in 1..rounds"),
        ("sites", len(fed.sites) >= 2, f"need at least 2 site folders (--site DIR, repeatable), got {len(fed.sites)}"),
        ("sites", fed.superlink is None or len(set(fed.sites)) == len(fed.sites), "site names must be distinct"),
    ]
    check_ranges(checks, label)
    if fed.swa_start is None:
        fed.swa_start = max(1, int(round(0.75 * fed.rounds)))
    return fed


# ----------------------------------------------------------------------------------------------
# The local Flower processes


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationFailed(f"{log}: the Flower process exited at start (code {proc.returncode}); see that log")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FederationFailed(f"{log}: the SuperLink did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _flower_bin(name: str) -> str:
    """A Flower executable next to this interpreter (a venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@dataclass
class LocalFederation:
    """A SuperLink and one SuperNode per site on 127.0.0.1, each in its own process group."""

    out: Path
    sites: dict[str, Path]
    port: int = 0
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.out / ".flwr")
        # The SuperLink and SuperNodes start flower-superexec / flwr-*app by name.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _start(self, key: str, args: list[str]) -> subprocess.Popen:
        log = self.out / "logs" / f"{key}.log"
        fh = open(log, "ab")
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        fh.close()
        self.procs[key] = proc
        return proc

    def start(self) -> None:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        # A fresh Flower home and an in-memory SuperLink each launch: nodes registered by an earlier
        # (killed) launch must not be sampled again. The run's own state lives in OUT, not here.
        shutil.rmtree(self.out / ".flwr", ignore_errors=True)
        (self.out / ".flwr").mkdir(parents=True)
        self.port = free_port()
        atomic_write_text(
            self.out / ".flwr" / "config.toml",
            f'[superlink]\ndefault = "skullrec"\n\n[superlink.skullrec]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n',
        )
        link = self._start("superlink", [
            _flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
        ])
        _wait_port(self.port, link, 60.0, self.out / "logs" / "superlink.log")
        for name, root in self.sites.items():
            self._start(f"site-{name}", [
                _flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"site={_toml_str(name)} data-root={_toml_str(str(root))}",
            ])

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process group (a SuperNode with the SuperExec and ClientApp it started)."""
        proc = self.procs[key]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop(self) -> None:
        # The SuperLink's SuperExec starts its own session (and the ServerApp in it), so the process
        # groups do not cover everything: collect the whole process tree first, end it last.
        tree = [pid for proc in self.procs.values() for pid in _descendants(proc.pid)]
        for key in list(self.procs)[::-1]:  # the SuperNodes first, the SuperLink last
            self.kill(key, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for key, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(key, signal.SIGKILL)
                proc.wait()
        # Children (SuperExec, app processes) may outlive their parent's TERM: end each group and each child.
        for key in self.procs:
            self.kill(key, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first-level first), from /proc (Linux); [] elsewhere."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _toml_str(s: str) -> str:
    return "'" + s.replace("'", "") + "'"  # TOML literal string (paths with ' are refused earlier)


@contextlib.contextmanager
def local_federation(out: Path, sites: dict[str, Path]) -> Iterator[LocalFederation]:
    """Start the processes, yield, always stop them."""
    fed = LocalFederation(out, sites)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()


# ----------------------------------------------------------------------------------------------
# The command


def _prepare_out(out: Path, resume: bool, overwrite: bool, sites: Sequence[str | Path] = ()) -> None:
    """Check the federation folder: resumable, or new (empty, or a federation folder to replace with --overwrite).

    ``sites`` (and the training config) are inputs: the folder may not overlap them (:mod:`skullrec.guards`).
    """
    from ..guards import check_outside_inputs
    from ..training.run_dir import check_new_run_dir

    check_outside_inputs(out, sites)  # replacing out must never delete a site's data
    if resume:
        if not (out / "federate.yaml").is_file():
            raise InputError(f"{out}: not a federation folder (no federate.yaml); nothing to resume")
        return
    if check_new_run_dir(out, overwrite):  # the trainer's rule: non-empty needs --overwrite
        if not (out / "federate.yaml").is_file():
            raise InputError(f"{out}: --overwrite only replaces a federation folder (no federate.yaml here)")
        # Its contents, not the folder: a symlinked --out stays a link to the same place.
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


RESUME_KEYS = ("rounds", "round_timeout")  # what --set may change on --resume (the rest defines the run)


def setup_federation(fed: FederateConfig, out: Path, resume: bool = False, overwrite: bool = False,
                     resume_overrides: list[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """Check sites and configs, then write ``out/config.yaml`` and ``out/federate.yaml``.

    On resume the stored files are used; ``resume_overrides`` may extend ``rounds`` or change ``round_timeout``."""
    out = Path(out)
    if resume:
        _prepare_out(out, True, False)
        from .server_app import load_federation

        cfg, stored = load_federation(out)
        if resume_overrides:
            changes = apply_overrides({}, resume_overrides)
            bad = sorted(set(changes) - set(RESUME_KEYS))
            if bad:
                raise ConfigError(f"--set {bad[0]}: cannot change on --resume (only {', '.join(RESUME_KEYS)})")
            merged = {k: v for k, v in stored.items() if k in {f.name for f in dataclasses.fields(FederateConfig)}}
            merged.update(changes)
            checked = _from_dict(FederateConfig, merged)
            if checked.rounds < read_state(out)["round"] or checked.rounds < 1 or checked.round_timeout <= 0:
                raise ConfigError(f"--set: rounds must be >= the rounds done ({read_state(out)['round']}), round_timeout > 0")
            stored.update({k: getattr(checked, k) for k in changes})
            atomic_write_text(out / "federate.yaml", yaml.safe_dump(stored, sort_keys=False))
        if not stored.get("superlink"):
            check_sites([Path(s["root"]) for s in stored["site_folders"]], cfg.model.size)
        return cfg, stored
    cfg = load_config(fed.train_config, fed.train_set)
    if fed.superlink is None:  # local sites: their folders are checked here, before anything is written
        for s in fed.sites:
            if "'" in s:
                raise InputError(f"{s}: a site folder name must not contain a quote (')")
        infos = check_sites([Path(s) for s in fed.sites], cfg.model.size)
        folders = [{"name": i["name"], "root": str(Path(s).resolve()), "train": i["train"]} for i, s in zip(infos, fed.sites)]
    else:  # remote sites: their folders live on their own machines, their ClientApps check them
        folders = [{"name": n, "root": None} for n in fed.sites]
    _prepare_out(out, False, overwrite, [fed.train_config, *(fed.sites if fed.superlink is None else ())])
    out.mkdir(parents=True, exist_ok=True)
    stored = dataclasses.asdict(fed)
    stored["out"] = str(out.resolve())
    stored["sites"] = [f["name"] for f in folders]
    stored["site_folders"] = folders
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(out / "federate.yaml", yaml.safe_dump(stored, sort_keys=False))
    return cfg, stored


def run_federation(out: Path, stored: dict[str, Any], *, on_start: Callable[[LocalFederation], None] | None = None,
                   echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start the local Flower processes, run the ServerApp to the last round (or a failure); returns the state.

    A site whose SuperNode process exits during the run ends it at once: no reply can come from it, and
    waiting for ``round_timeout`` would only delay the same outcome (a real federation, where the server
    cannot see the sites' processes, relies on the timeout). The round in progress is then not
    committed (the ServerApp is stopped; it commits a round in one atomic write of its state file)."""
    out = Path(out).resolve()
    echo = echo or (lambda s: print(s, flush=True))
    if stored.get("superlink"):
        return _run_remote(out, stored, echo)
    sites = {s["name"]: Path(s["root"]) for s in stored["site_folders"]}
    dead: list[str] = []
    with local_federation(out, sites) as lf:
        if on_start is not None:
            on_start(lf)
        args = [_flower_bin("flwr"), "run", str(APP_DIR), "skullrec", "--stream", "--run-config", f"out={_toml_str(str(out))}"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=lf.env, text=True, start_new_session=True)
        reader = threading.Thread(target=_copy_log, args=(proc, out / "logs" / "server.log", echo), daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                dead = [name for name in sites if lf.procs[f"site-{name}"].poll() is not None]
                if dead:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    reader.join(timeout=5)
    state = read_state(out)
    if dead and not _finished(out, stored):
        last = (read_metrics(out) or [{}])[-1]
        if last.get("status") != "failed" or last.get("round") != state["round"] + 1:
            from .server_app import _append_metrics

            _append_metrics(out, {"round": state["round"] + 1, "status": "failed", "sites": {}, "errors": {},
                                  "missing": sorted(dead), "reason": "SuperNode exited"})
    return _outcome(out, stored)


def _outcome(out: Path, stored: dict[str, Any]) -> dict[str, Any]:
    """The final state, or FederationFailed naming the failed round and the missing sites."""
    state = read_state(out)
    if not _finished(out, stored):
        last = (read_metrics(out) or [{}])[-1]
        if last.get("status") == "failed":
            missing = ", ".join(last.get("missing", []) + sorted(last.get("errors", {}))) or "-"
            raise FederationFailed(
                f"{out}: round {last['round']} failed (no reply from: {missing}); the global model stays at round "
                f"{state['round']}; continue with: skullrec federate --resume {out}"
            )
        raise FederationFailed(f"{out}: the federation stopped after round {state['round']} of {stored['rounds']}; see {out / 'logs' / 'server.log'}")
    return state


def _run_remote(out: Path, stored: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """``flwr run`` against the named SuperLink connection of the user's Flower config (a real federation)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args = [_flower_bin("flwr"), "run", str(APP_DIR), str(stored["superlink"]), "--stream", "--run-config", f"out={_toml_str(str(out))}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _copy_log(proc, out / "logs" / "server.log", echo)
    proc.wait()
    return _outcome(out, stored)


def _copy_log(proc: subprocess.Popen, path: Path, echo: Callable[[str], None]) -> None:
    """Copy ``flwr run --stream`` output to the server log; echo the ServerApp's own lines (round ..., error: ...)."""
    assert proc.stdout is not None
    with open(path, "ab") as log:
        for line in proc.stdout:
            log.write(line.encode())
            log.flush()
            text = line.rstrip()
            if text.startswith(("round ", "error: ")):
                echo(text)


def _finished(out: Path, stored: dict[str, Any]) -> bool:
    return int(read_state(out)["round"]) >= int(stored["rounds"])


def federate(config: Path | None, sites: list[Path], overrides: list[str], train_overrides: list[str],
             out: Path | None, resume: Path | None, overwrite: bool, echo: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """Check everything, then run (or resume) the federation; returns the folder and its final state.

    ``echo`` gets the progress lines (what is starting, one line per round)."""
    if resume is not None:
        folder = Path(resume)
        cfg, stored = setup_federation(FederateConfig(), folder, resume=True, resume_overrides=overrides)
        if _finished(folder, stored):
            echo(f"{folder}: all {stored['rounds']} rounds done; nothing to do")
            return folder, read_state(folder)
        echo(f"resuming {folder} after round {read_state(folder)['round']}")
    else:
        fed = load_federation_config(config, overrides, sites)
        if train_overrides:
            fed.train_set = list(fed.train_set) + list(train_overrides)
        folder = Path(out) if out is not None else Path(fed.out)
        cfg, stored = setup_federation(fed, folder, overwrite=overwrite)
        echo(
            f"federating {stored['name']}: {len(stored['sites'])} sites ({', '.join(stored['sites'])}), {stored['rounds']} rounds of "
            f"{stored['local_epochs']} local epoch(s), {stored['strategy']}, local method {cfg.train.method} -> {folder}"
        )
    return folder, run_federation(folder, stored, echo=echo)


__all__ = ["FederateConfig", "FederationFailed", "load_federation_config", "setup_federation", "run_federation",
           "LocalFederation", "local_federation", "federate", "APP_DIR"]
