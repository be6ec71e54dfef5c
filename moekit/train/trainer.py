"""The training loop: AdamW with warmup and cosine decay, gradient accumulation and clipping, fp32 or bf16
autocast, balancing losses and the auxiliary-loss-free bias, multi-token prediction, validation, routing
telemetry, atomic checkpoints with exact resume, and the final model as a Hugging Face directory.

RUN_DIR/metrics.jsonl   one JSON object per logged step (step, loss, tokens_per_s, max_vio, lr, ... and the load
                        of every MoE layer) and per validation (step, val_loss, max_vio_global, per-layer loads and
                        co-activation)
RUN_DIR/run.json        the model and training configs
RUN_DIR/checkpoints/    step-NNNNNNNN/ directories (see moekit.train.checkpoint)
RUN_DIR/final/          config.json + model.safetensors (+ tokenizer.json): moekit.from_pretrained, moekit generate
                        and, for a layout transformers knows, transformers itself load it"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.checkpoint.files import write_atomic
from moekit.checkpoint.hf_checkpoint import save_pretrained
from moekit.config.model import ModelConfig
from moekit.distributed.training import OneProcess
from moekit.model.count import count_parameters
from moekit.model.decoder import MoEDecoder
from moekit.routing.balancing import LossFreeBalancer
from moekit.routing.router import warn_untrainable_router
from moekit.train.checkpoint import checkpoints_dir, list_checkpoints, load_checkpoint, save_checkpoint
from moekit.train.config import TrainConfig, run_config_dict
from moekit.train.data import TokenStream, load_corpus
from moekit.train.telemetry import LoadAccumulator
from moekit.train.tokenizer import BPETokenizer, ByteTokenizer

METRICS, RUN = "metrics.jsonl", "run.json"
# Training settings a resumed run may change (they do not alter the steps already taken).
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "log_every", "save_every", "keep_last", "tensorboard"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: MoEDecoder, cfg: TrainConfig) -> torch.optim.AdamW:
    """Decay on matrices and expert weights; none on norms, biases and embeddings-free vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step instead of a dozen elementwise passes per tensor (CPU and CUDA)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lm_loss(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[i + shift] from position i."""
    t = ids_BT.shape[1] - shift
    logits = logits_BTV[:, :t].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids_BT[:, shift:].reshape(-1))


class Trainer:
    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        run_dir: str | Path,
        init: MoEDecoder | None = None,
        progress: bool = True,
        parallel: OneProcess | None = None,
    ):
        """parallel: ExpertParallelRun() to train over the processes of the default group (moekit train --ep)."""
        self.parallel = parallel or OneProcess()
        self.cfg, self.run_dir, self.progress = train_cfg, Path(run_dir), progress and self.parallel.main
        train_text, val_text, self.data_name = load_corpus(
            train_cfg.data, train_cfg.max_train_bytes, train_cfg.max_val_bytes
        )
        self.tokenizer = self._tokenizer(train_text)
        model_cfg = replace(model_cfg, vocab_size=self.tokenizer.vocab_size)
        if init is not None and init.config.vocab_size != model_cfg.vocab_size:
            raise ValueError(
                f"the initial model's vocabulary ({init.config.vocab_size}) does not match the tokenizer's "
                f"({model_cfg.vocab_size})"
            )
        encode = lambda text: torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        self.train_stream = TokenStream(encode(train_text), train_cfg.seq_len, "the training text")
        self.val_stream = TokenStream(encode(val_text), train_cfg.seq_len, "the validation text")
        torch.manual_seed(train_cfg.seed)
        self.model = init.train() if init is not None else MoEDecoder(model_cfg).train()
        self.model_cfg = self.model.config
        if self.model_cfg.moe is not None and self.model_cfg.moe_layers:
            warn_untrainable_router(self.model_cfg.moe)
        self.parallel.prepare(self.model, train_cfg.batch_size)
        self.optimizer = _optimizer(self.model, train_cfg)
        rate = self.model_cfg.moe.bias_update_rate if self.model_cfg.moe else 0.0
        self.balancer = LossFreeBalancer(self.model.routers(), rate) if rate > 0 else None
        self.step = 0
        self.tensorboard = None

    def _tokenizer(self, train_text: str):
        if self.cfg.tokenizer == "byte":
            return ByteTokenizer()
        saved = self.run_dir / "tokenizer.json"
        if saved.is_file():  # a resumed run keeps its vocabulary
            return BPETokenizer.load(saved)
        tok = BPETokenizer.train(train_text, self.cfg.vocab_size)
        if self.parallel.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tok.save(self.run_dir)
        return tok

    def _autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return nullcontext()

    # ---- run bookkeeping -------------------------------------------------------------------------------------

    def _run_state(self) -> dict:
        return run_config_dict(self.model_cfg, self.cfg)

    def start(self, resume: bool | str | Path = False) -> None:
        """Create the run directory (refusing one that already holds another run), or resume from its latest
        checkpoint (or the given checkpoint directory) after checking it was made by the same configuration."""
        run, main = self.run_dir / RUN, self.parallel.main
        if not resume:
            if (self.run_dir / METRICS).exists() or list_checkpoints(self.run_dir):
                raise ValueError(
                    f"{self.run_dir} already holds a training run: pass --resume to continue it, or another --out"
                )
            self.parallel.barrier()  # every rank looked before rank 0 writes
            if main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                _write_json(run, self._run_state())
                (self.run_dir / METRICS).write_text("")
            return
        if resume is True:
            found = list_checkpoints(self.run_dir)
            if not found:
                raise ValueError(f"no checkpoint under {self.run_dir / 'checkpoints'} to resume from")
            path = found[-1]
        else:
            path = Path(resume)
        local = self.parallel.localize(self.optimizer)
        state = load_checkpoint(path, self.model, self.optimizer, check=self._check_compatible, local=local)
        self.step = int(state["step"])
        self.parallel.barrier()
        if main:
            _write_json(run, self._run_state())
            _truncate_metrics(self.run_dir / METRICS, self.step)

    def _check_compatible(self, state: dict, path: Path) -> None:
        if "model" not in state:
            raise ValueError(f"{path} is not a moekit training checkpoint (no trainer.json)")
        ours = self._run_state()
        if state["model"] != ours["model"]:
            fields = sorted(k for k in ours["model"] if state["model"].get(k) != ours["model"][k])
            raise ValueError(f"cannot resume from {path}: its model differs in {', '.join(fields)}")
        theirs = {k: v for k, v in state["train"].items() if k not in RESUMABLE_CHANGES}
        mine = {k: v for k, v in ours["train"].items() if k not in RESUMABLE_CHANGES}
        if theirs != mine:
            fields = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise ValueError(f"cannot resume from {path}: its training settings differ in {', '.join(fields)}")

    def _log(self, record: dict) -> None:
        if not self.parallel.main:
            return
        with open(self.run_dir / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    # ---- the loop ---------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns the step's metrics."""
        cfg, model = self.cfg, self.model
        start = time.perf_counter()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loads = LoadAccumulator()
        sums = {"loss": 0.0, "aux_loss": 0.0, "mtp_loss": 0.0}
        for micro in range(cfg.grad_accum):
            ids_BT = self.parallel.share(self.train_stream.batch(cfg.batch_size, cfg.seed, self.step, micro))
            with self._autocast():
                out = model(ids_BT, return_routing=True, return_mtp=self.model_cfg.mtp_layers > 0)
                loss = lm_loss(out.logits, ids_BT)
                total = loss + out.aux_loss
                if out.mtp_logits:
                    mtp = sum(lm_loss(lg, ids_BT, 2 + j) for j, lg in enumerate(out.mtp_logits)) / len(out.mtp_logits)
                    total = total + cfg.mtp_weight * mtp
                    sums["mtp_loss"] += float(mtp.detach()) / cfg.grad_accum
            (total / cfg.grad_accum).backward()
            sums["loss"] += float(loss.detach()) / cfg.grad_accum
            sums["aux_loss"] += float(out.aux_loss.detach()) / cfg.grad_accum
            loads.add({i: info for i, info in out.moe.items() if i < self.model_cfg.num_layers})
        grad_norm = self.parallel.finish_gradients(model, cfg.grad_clip or float("inf"))
        keys = sorted(sums)
        sums = dict(zip(keys, self.parallel.mean([sums[k] for k in keys]), strict=True))
        self.parallel.sum_loads(loads)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer is not None:
            self.balancer.step()
        self.step += 1
        seconds = time.perf_counter() - start
        tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        record = {"step": self.step, **sums, "lr": lr, "grad_norm": float(grad_norm)}
        if not self.model_cfg.mtp_layers:
            record.pop("mtp_loss")
        record.update(tokens=tokens, tokens_per_s=tokens / seconds, max_vio=loads.max_vio())
        record.update(dropped_fraction=loads.dropped_fraction(), layers=loads.layers())
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss over the held-out batches, and each layer's global load over them (MaxVio_global, Wang et al.)."""
        model, cfg = self.model, self.cfg
        model.eval()
        loads = LoadAccumulator(coactivation=True)
        total, n = 0.0, 0
        for ids_BT in self.val_stream.windows(cfg.batch_size, cfg.eval_batches):
            ids_BT = self.parallel.share(ids_BT)
            with self._autocast():
                out = model(ids_BT, return_routing=True)
            total += float(lm_loss(out.logits, ids_BT)) * ids_BT.shape[0]
            n += ids_BT.shape[0]
            loads.add(out.moe)
        model.train()
        total, n = (x * self.parallel.ranks for x in self.parallel.mean([total, n]))
        self.parallel.sum_loads(loads)
        val_loss = total / max(n, 1)
        return {
            "step": self.step,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "max_vio_global": loads.max_vio(),
            "layers": loads.layers(),
        }

    def run(self, until: int | None = None) -> dict:
        """Train from the current step to `until` (default: cfg.steps, the end of the schedule, where the final
        model is written); returns a summary."""
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        first_loss = last = None
        val: dict | None = None
        start, start_step = time.perf_counter(), self.step
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not self.progress, unit="step")
        while self.step < until:
            record = self.train_step()
            first_loss = record["loss"] if first_loss is None else first_loss
            last = record
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(record)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s  MaxVio {record['max_vio']:.2f}"
                + (f"  val {val['val_loss']:.3f}" if val else "")
            )
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val = self.evaluate()
                self._log(val)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if val is None:  # nothing left to train (resumed at the end): still report the model's validation
            val = self.evaluate()
        final = self.save_final() if self.step == cfg.steps else None
        seconds = time.perf_counter() - start
        tokens = (self.step - start_step) * cfg.batch_size * cfg.grad_accum * cfg.seq_len
        return {
            "run_dir": str(self.run_dir),
            "final": str(final) if final else None,
            "steps": self.step,
            "data": self.data_name,
            "params": self.parameter_counts(),
            "first_loss": first_loss,
            "last_loss": last["loss"] if last else None,
            "val_loss": val["val_loss"],
            "max_vio_global": val["max_vio_global"],
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }

    def parameter_counts(self) -> dict:
        """count_parameters of the whole model (an expert-parallel rank holds a share of the experts)."""
        if self.parallel.ranks == 1:
            return count_parameters(self.model)
        with torch.device("meta"):
            return count_parameters(MoEDecoder(self.model_cfg))

    def save(self) -> Path:
        state = {"step": self.step, **self._run_state()}
        weights, optimizer = self.parallel.state(self.model, self.optimizer)
        path = checkpoints_dir(self.run_dir) / f"step-{self.step:08d}"
        if self.parallel.main:
            path = save_checkpoint(self.run_dir, self.step, weights, optimizer, state, self.cfg.keep_last)
        self.parallel.barrier()
        return path

    def save_final(self) -> Path:
        final = self.run_dir / "final"
        whole = self.parallel.full_model(self.model)
        if self.parallel.main:
            save_pretrained(whole, final)
            self.tokenizer.save(final)
            _write_json(final / "moekit_run.json", {"step": self.step, **self._run_state()})
        self.parallel.barrier()
        return final


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))
