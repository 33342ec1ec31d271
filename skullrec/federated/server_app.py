"""The Flower ServerApp: FedAvg, or FedAvg + server-side SWA (FedSAM's recipe), with skullrec's run folder.

Flower's own FedAvg (``flwr.serverapp.strategy.FedAvg``) runs the rounds: it samples the sites, sends
the global weights, and averages the replies weighted by each site's number of training cases. This
module adds what a skullrec run needs around it:

- **a round commits only when every site answered** (``min-sites``, default all): a site that died or
  timed out mid-round leaves the global model exactly as the last committed round left it (Flower's
  FedAvg alone would average the survivors); the round is recorded as failed and the run stops;
  ``skullrec federate --resume`` redoes it.
- **server-side SWA** (strategy ``fedavg-swa``; Caldarola et al. 2022 use it with SAM/ASAM clients,
  "FedSAM + SWA"): from round ``swa-start`` on, the server keeps the running mean of the global models
  collected at the end of each cycle of ``swa_cycle`` rounds, ``swa_n = (swa_n-1 * (n-1) + w_r) / n``,
  and the sites' learning rate follows the cyclic schedule of :func:`client_lr` (constant for
  ``swa_cycle`` 1). The clients keep receiving the FedAvg model; the SWA model is the run's result
  (``final.safetensors``).
- **the run folder** (OUT)::

      config.yaml            the training config every site trains with
      federate.yaml          the federation config (sites, rounds, strategy, ...)
      metrics.jsonl          one record per round: per-site loss / cases / held-out DSC, their means, status
      last.safetensors       the global model after the last committed round
      swa.safetensors        the SWA model (fedavg-swa, once swa-start is reached)
      final.safetensors      the result: swa for fedavg-swa (when it exists), else last
      round_NNN.safetensors  the global model at the federation's checkpoint_rounds
      state.safetensors      global weights, SWA mean, round, SWA count: one atomic write, the commit point
                             of a round (the files above are written before it; --resume reads only this)

  Checkpoints are skullrec.nets.checkpoint safetensors (no pickle), written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config, dump_config, load_config
from safetensors import safe_open
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from ..errors import InputError
from ..io import atomic_write_bytes
from ..nets.checkpoint import save_checkpoint
from ..training.run_dir import read_metrics as run_dir_metrics
from ..training.run_dir import write_metrics

STATE = "state.safetensors"
METRICS = "metrics.jsonl"
LAST, SWA, FINAL = "last.safetensors", "swa.safetensors", "final.safetensors"


class RoundFailed(RuntimeError):
    """A round in which fewer than min-sites sites answered; nothing of it was committed."""


def read_state(out: Path) -> dict[str, Any]:
    """The committed round and SWA count of a federation folder ({'round': 0, 'swa_n': 0} before the first commit)."""
    path = Path(out) / STATE
    if not path.is_file():
        return {"round": 0, "swa_n": 0}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"round": int(meta["round"]), "swa_n": int(meta["swa_n"])}
    except Exception:  # safetensors raises several types for a damaged header
        raise InputError(f"{path}: unreadable federation state") from None


def save_state(out: Path, round_: int, swa_n: int, weights: dict[str, torch.Tensor], swa: dict[str, torch.Tensor] | None) -> None:
    """The commit of a round: the global weights, the SWA mean and the counters in one atomic safetensors file."""
    tensors = {f"global/{k}": v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    if swa is not None:
        tensors.update({f"swa/{k}": v.detach().to("cpu").contiguous().clone() for k, v in swa.items()})
    atomic_write_bytes(Path(out) / STATE, st_save(tensors, metadata={"round": str(round_), "swa_n": str(swa_n)}))


def load_state_weights(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The committed global weights and SWA mean (None before swa-start), read without pickle."""
    tensors = st_load_file(str(Path(out) / STATE))
    weights = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("global/")}
    swa = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("swa/")}
    return weights, (swa or None)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The round records of metrics.jsonl in file order (empty when absent; a torn line is skipped)."""
    # run_dir.read_metrics sorts by "epoch"; round records have none, so the stable sort keeps file order.
    return run_dir_metrics(Path(out) / METRICS)


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    write_metrics(Path(out) / METRICS, read_metrics(out) + [record])


def _site(msg: Any) -> str:
    """The site name a reply carries; an error reply carries no content, only its node id."""
    if msg.has_content() and "site" in msg.content:
        return str(msg.content["site"]["name"])
    return f"node {msg.metadata.src_node_id}"


def _weighted_mean(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total > 0 else None


try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError:  # flwr is optional for everything but federated training
    FedAvg = None  # type: ignore[assignment,misc]


if FedAvg is not None:

    class SkullFedAvg(FedAvg):
        """Flower's FedAvg with all-sites commits, optional server-side SWA and skullrec's run folder."""

        def __init__(self, out: Path, cfg: Config, fed: dict[str, Any], state: dict[str, Any], swa: dict[str, torch.Tensor] | None) -> None:
            n = len(fed["sites"])
            evaluate = bool(fed.get("evaluate", True))
            super().__init__(min_train_nodes=n, min_evaluate_nodes=n if evaluate else 0, min_available_nodes=n,
                             fraction_evaluate=1.0 if evaluate else 0.0)
            self.out, self.cfg, self.fed = out, cfg, fed
            self.min_sites = int(fed.get("min_sites") or n)
            self.offset = int(state["round"])  # Flower counts the rounds of this start from 1
            self.swa, self.swa_n = swa, int(state.get("swa_n", 0))
            self.pending: dict[str, Any] = {}
            self.t0 = time.perf_counter()
            # One module each for the global and the SWA weights, loaded every round (not rebuilt per round).
            self.model, self.swa_model = _model(cfg), _model(cfg)

        def _round(self, server_round: int) -> int:
            return self.offset + server_round

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # type: ignore[override]
            config["round"] = self._round(server_round)
            config["lr"] = client_lr(self.fed, self.cfg.train.lr, self._round(server_round))
            self.t0 = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):  # type: ignore[override]
            config["round"] = self._round(server_round)
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies):  # type: ignore[override]
            r = self._round(server_round)
            replies = list(replies)
            valid = [m for m in replies if not m.has_error()]
            sites = {_site(m): dict(next(iter(m.content.metric_records.values()))) for m in valid}
            errors = {_site(m): m.error.reason for m in replies if m.has_error()}
            missing = sorted(set(self.fed["sites"]) - set(sites) - set(errors))
            if len(valid) < self.min_sites:
                _append_metrics(self.out, {
                    "round": r, "status": "failed", "sites": sites, "errors": errors, "missing": missing,
                    "seconds": time.perf_counter() - self.t0,
                })
                raise RoundFailed(
                    f"round {r}: {len(valid)} of {len(self.fed['sites'])} sites answered (missing: {', '.join(missing + sorted(errors)) or '-'}); "
                    f"the global model stays at round {r - 1}"
                )
            arrays, metrics = super().aggregate_train(server_round, valid)
            self.pending = {"round": r, "arrays": arrays, "sites": sites, "errors": errors, "missing": missing, "train": dict(metrics or {})}
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies):  # type: ignore[override]
            # Own aggregation: sites may hold different evaluation splits (Flower's would refuse unequal keys).
            valid = [m for m in replies if not m.has_error()]
            for m in valid:
                rec = dict(next(iter(m.content.metric_records.values())))
                self.pending["sites"].setdefault(_site(m), {}).update({k: v for k, v in rec.items() if k.startswith("dsc_")})
            self._commit()
            return None

        def _commit(self) -> None:
            """Checkpoints, SWA, metrics, then state.safetensors (last: the commit point of the round)."""
            p = self.pending
            r = p["round"]
            model = self.model
            model.load_state_dict(p["arrays"].to_torch_state_dict())
            meta = {"round": r, "strategy": self.fed["strategy"], "method": self.cfg.train.method, "sites": self.fed["sites"]}
            save_checkpoint(self.out / LAST, model, self.cfg, **meta)
            if r in self.fed.get("checkpoint_rounds", []):
                save_checkpoint(self.out / f"round_{r:03d}.safetensors", model, self.cfg, **meta)
            final, final_model = LAST, model
            if swa_collects(self.fed, r):
                w = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
                self.swa_n += 1
                if self.swa is None or self.swa_n == 1:
                    self.swa = w
                else:
                    self.swa = {k: self.swa[k] + (w[k] - self.swa[k]) / self.swa_n for k in w}
            if self.swa is not None:
                self.swa_model.load_state_dict({k: v.float() for k, v in self.swa.items()})
                if swa_collects(self.fed, r):
                    save_checkpoint(self.out / SWA, self.swa_model, self.cfg, swa_n=self.swa_n, **meta)
                final, final_model = SWA, self.swa_model
            save_checkpoint(self.out / FINAL, final_model, self.cfg, result=final, swa_n=self.swa_n, **meta)
            sites = p["sites"]
            dice = [(s["dice_loss"], s["num-examples"]) for s in sites.values() if "dice_loss" in s]
            dsc_keys = sorted({k for s in sites.values() for k in s if k.startswith("dsc_")})
            record = {
                "round": r, "status": "ok", "strategy": self.fed["strategy"], "method": self.cfg.train.method,
                "lr": client_lr(self.fed, self.cfg.train.lr, r),
                "dice_loss": _weighted_mean(dice),
                **{k: _weighted_mean([(s[k], s["num-examples"]) for s in sites.values() if k in s]) for k in dsc_keys},
                "swa_n": self.swa_n, "sites": sites, "errors": p["errors"], "missing": p["missing"],
                "seconds": time.perf_counter() - self.t0,
            }
            _append_metrics(self.out, record)
            save_state(self.out, r, self.swa_n, model.state_dict(), self.swa)
            dsc = "  ".join(f"{k} {record[k]:.4f}" for k in dsc_keys if record[k] is not None)
            print(f"round {r}/{self.fed['rounds']}  loss {record['dice_loss']:.4f}  {dsc}  {record['seconds']:.1f} s", flush=True)


def client_lr(fed: dict[str, Any], lr: float, round_: int) -> float:
    """The sites' learning rate in ``round_``: ``lr``, or FedSAM + SWA's cyclic schedule.

    Caldarola et al. (2022) take SWA's cyclic schedule (Izmailov et al. 2018) from iterations to rounds:
    from ``swa_start`` on, in cycles of ``swa_cycle`` = c rounds, round j = 1..c of a cycle trains at
    ``(1 - j/c) * lr + (j/c) * swa_lr``, so the last round of each cycle trains at ``swa_lr`` and its
    global model is the one SWA collects (:func:`swa_collects`), as Izmailov et al. define it.
    ``swa_cycle`` 1 keeps ``lr`` constant and collects every round from ``swa_start`` (the default of
    the authors' code; their paper scripts use c = 10)."""
    c = int(fed.get("swa_cycle") or 1)
    if fed.get("strategy") != "fedavg-swa" or c == 1 or round_ < int(fed["swa_start"]):
        return float(lr)
    t = ((round_ - int(fed["swa_start"])) % c + 1) / c
    return float((1 - t) * lr + t * swa_lr_of(fed, lr))


def swa_lr_of(fed: dict[str, Any], lr: float) -> float:
    """``swa_lr`` of the federation, default lr / 100 (the authors' scripts: client lr 1e-2, swa_lr 1e-4)."""
    return float(fed["swa_lr"]) if fed.get("swa_lr") is not None else float(lr) / 100


def swa_collects(fed: dict[str, Any], round_: int) -> bool:
    """Whether the server's SWA mean takes the global model of ``round_`` (fedavg-swa: the end of each cycle)."""
    if fed.get("strategy") != "fedavg-swa" or round_ < int(fed["swa_start"]):
        return False
    return (round_ - int(fed["swa_start"]) + 1) % int(fed.get("swa_cycle") or 1) == 0


def _model(cfg: Config) -> torch.nn.Module:
    from ..nets.autoencoder import build_model

    return build_model(cfg.model, seed=cfg.seed)


def load_federation(out: Path) -> tuple[Config, dict[str, Any]]:
    """The training config and the federation settings stored in a federation folder by ``skullrec federate``."""
    import yaml

    cfg = load_config(out / "config.yaml")
    fed = yaml.safe_load((out / "federate.yaml").read_text())
    return cfg, fed


def initial_state(out: Path, cfg: Config) -> tuple[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor] | None]:
    """The model to start from (seeded initial weights, or the last committed round's), the state and the SWA mean."""
    state = read_state(out)
    model = _model(cfg)
    swa = None
    if state["round"] > 0:
        weights, swa = load_state_weights(out)
        model.load_state_dict(weights)
    return model, state, swa


if FedAvg is not None:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Run the remaining rounds of the federation in ``run_config['out']``."""
        out = Path(str(context.run_config["out"]))
        cfg, fed = load_federation(out)
        model, state, swa = initial_state(out, cfg)
        remaining = int(fed["rounds"]) - int(state["round"])
        if remaining <= 0:
            print(f"{out}: all {fed['rounds']} rounds done", flush=True)
            return
        strategy = SkullFedAvg(out, cfg, fed, state, swa)
        conf = ConfigRecord({"local-epochs": int(fed["local_epochs"]), "train-config": dump_config(cfg)})
        try:
            strategy.start(
                grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=remaining,
                timeout=float(fed["round_timeout"]), train_config=conf, evaluate_config=ConfigRecord(dict(conf)),
            )
        except RoundFailed as exc:
            print(f"error: {exc}", flush=True)
            raise
