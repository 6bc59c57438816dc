"""Why LoRA recovery does (or does not) recover: one pruned model, several LoRA settings at the same data budget.

Prunes SmolLM2-135M-Instruct once (20% block-wise, --importance, the structural table's calibration), then for each
setting trains LoRA from that same pruned model on the first --records Alpaca records and measures
WikiText-2/PTB perplexity (gptq protocol, first --windows windows) and the response loss on --heldout Alpaca
records taken from the end of the file (never trained on). The no-LoRA pruned model is measured the same way.

A setting is ``lr:batch_size:grad_accum[:inputs]``; ``inputs`` also takes the loss on the prompt tokens
(alpaca-lora's train_on_inputs=True). Every setting trains on the same records for --epochs.

    python bench/e2e/lora_sweep.py --data-dir ../shared/data --settings 1e-4:8:4,1e-4:4:1,3e-4:4:1,1e-3:4:1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sparsefast.bench.results import result_path, run_metadata


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "inputs"):
        raise ValueError(f"setting {text!r} is not lr:batch_size:grad_accum[:inputs]")
    return {"lr": float(parts[0]), "batch_size": int(parts[1]), "grad_accum": int(parts[2]),
            "train_on_inputs": len(parts) == 4}


@torch.no_grad()
def response_loss(model, samples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per label token over ``samples`` (the recovery objective, on held-out records)."""
    from sparsefast.recover.data import collate

    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        b = collate(samples[i:i + batch_size], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                         labels.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def main(argv: list[str] | None = None) -> int:
    from sparsefast.api import evaluate, versions
    from sparsefast.checkpoint import write_json
    from sparsefast.data import get_calibration
    from sparsefast.models import load_model
    from sparsefast.prune.structural import StructuralConfig, prune_structured
    from sparsefast.recover import RecoverConfig, load_recovery_data, lora_recover, tokenize_recovery_data
    from sparsefast.recover.data import RecoveryData

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--importance", default="element2")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--settings", default="1e-4:8:4,1e-4:4:1,3e-4:4:1,1e-3:4:1")
    p.add_argument("--records", type=int, default=400)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings.split(",")]
    configs = [RecoverConfig(epochs=args.epochs, max_samples=args.records, lr=s["lr"], batch_size=s["batch_size"],
                             grad_accum=s["grad_accum"]) for s in settings]
    out = Path(args.out) if args.out else result_path("lora-sweep", device="cpu")

    model, tok = load_model(args.model, device="cpu")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = load_recovery_data("alpaca", data_dir=args.data_dir)
    if args.records + args.heldout > len(data.records):
        p.error(f"--records {args.records} + --heldout {args.heldout} exceed the {len(data.records)} records")
    train = RecoveryData(data.kind, data.records[:args.records], data.source)
    heldout = RecoveryData(data.kind, data.records[-args.heldout:], data.source)
    train_samples, _ = tokenize_recovery_data(train, tok, 256)
    heldout_samples, _ = tokenize_recovery_data(heldout, tok, 256)
    calib = get_calibration("c4", tok, 10, 128, seed=0, data_dir=args.data_dir)
    prune_structured(model, tok, StructuralConfig(ratio=args.ratio, importance=args.importance, seed=0), calib)

    def measure(m) -> dict:
        ppl = evaluate(m, tok, ["wikitext2", "ptb"], seqlen=512, protocol="gptq", data_dir=args.data_dir,
                       max_windows=args.windows, progress=False)
        return {"ppl_gptq": {k: float(v) for k, v in ppl.items()},
                "heldout_response_loss": response_loss(m, heldout_samples, pad_id)}

    result = {"what": f"LoRA settings on one {args.importance}-pruned SmolLM2 (20% block-wise), same data budget",
              "metadata": run_metadata("cpu"), "versions": versions(), "command": " ".join([sys.executable, *sys.argv]),
              "budget": {"records": args.records, "epochs": args.epochs, "heldout_records": args.heldout,
                         "ppl_windows": args.windows, "ppl_seqlen": 512},
              "rows": [{"setting": "no LoRA", **measure(model)}]}
    write_json(out, result)
    print(result["rows"][-1], flush=True)
    for setting, cfg in zip(settings, configs):
        samples = train_samples
        if setting["train_on_inputs"]:
            samples = [{"input_ids": s["input_ids"], "labels": list(s["input_ids"])} for s in train_samples]
        t = time.perf_counter()
        recovered, stats = lora_recover(copy.deepcopy(model), tok, samples, cfg, progress=False)
        row = {"setting": setting, "config": {**asdict(cfg), "target_modules": list(cfg.target_modules)},
               "optimizer_steps": stats["optimizer_steps"], "label_tokens": stats["label_tokens"],
               "train_seconds": time.perf_counter() - t, "first_loss": stats["first_loss"],
               "last_loss": stats["last_loss"], "losses": stats["losses"], **measure(recovered)}
        result["rows"].append(row)
        write_json(out, result)
        print({k: v for k, v in row.items() if k not in ("losses", "config")}, flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
