"""ONNX export of a transformers encoder checkpoint for bench/bench.py's ONNX Runtime rows: the
base model's last_hidden_state (AutoModel, FP32, eval mode, eager attention), inputs input_ids
and attention_mask (int64, dynamic batch and sequence axes), TorchScript exporter
(dynamo=False: it needs neither onnx nor onnxscript in this environment), opset 17.

Runs in a torch environment (bench/export-onnx picks or makes one), not in .venv. Also writes
DIR/reference.json: torch's own last_hidden_state, mean-pooled, for two fixed inputs, which
bench.py compares with ONNX Runtime F32 on the exported file before timing it.

Usage: python bench/export_onnx.py CHECKPOINT_DIR OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModel

OPSET = 17


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def main(checkpoint, out):
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    wrapped = LastHidden(model).eval()
    cfg = model.config
    low = 5  # past the special tokens of every family here
    ids = torch.randint(low, cfg.vocab_size, (2, 24), dtype=torch.int64)
    mask = torch.ones_like(ids)
    tmp = out / "model.onnx.tmp"
    with torch.no_grad():
        torch.onnx.export(
            wrapped, (ids, mask), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                          "attention_mask": {0: "batch", 1: "sequence"},
                          "last_hidden_state": {0: "batch", 1: "sequence"}},
            do_constant_folding=True)
        ref_ids = torch.randint(low, cfg.vocab_size, (3, 40), dtype=torch.int64)
        pooled = wrapped(ref_ids, torch.ones_like(ref_ids)).mean(dim=1)
    tmp.replace(out / "model.onnx")
    (out / "reference.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "model_type": cfg.model_type, "opset": OPSET,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "input_ids": ref_ids.tolist(), "pooled": pooled.tolist()}))
    print(f"exported {checkpoint} ({type(model).__name__}) to {out / 'model.onnx'}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
