"""Copy a trained image adapter's checkpoint into the package assets with a README holding
its held-out accuracy and sample answers.

    python -m scripts.export_omni_asset runs-out/omni-adapter src/megrez/assets/megrez2-tiny-omni

A run whose held-out accuracy is below MIN_ACCURACY is refused (the package would otherwise
ship a model that `megrez chat --image` uses by default and that answers wrongly).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

README = """# megrez2-tiny-omni

The bundled Megrez2 chat model (`megrez2-tiny-chat`, {host}) hosted by MegrezO
(`llm_architecture: MegrezMoeForCausalLM`) with a small image adapter, so that `megrez chat
--image PICTURE` works out of the box. It is a demonstration that the multimodal pipeline
learns, not a useful vision model: it knows pictures of one coloured shape (circle, square,
triangle) or one coloured digit (0-9) on a light background, in red, green, blue or yellow.

- image adapter: navit SigLIP {layers} layers x {hidden} wide (patch 14, crops of ~{size}x{size} pixels),
  resampler to {query} tokens per picture, and the embeddings of the image delimiter tokens;
  {vision_params} parameters. No audio tower (`audio_config: null`).
- training (`megrez train image-adapter`, recipe `runs/shipped_omni.sh`, {seconds:.0f} s on one CPU core):
  {stage1}{steps} steps of {batch} synthetic pictures with a question each; final loss {loss:.3f}.
- held-out accuracy (greedy, exact answer, {n} questions on fresh pictures, through the engine):
  **{acc:.1%}** overall; {per}.

Questions it was trained on, one per conversation: "What shape is in the picture?", "What colour
is the shape?", "What digit is in the picture?", "What colour is the digit?". A follow-up
question in the same conversation is outside what it learned (start a new chat per question).

```
{examples}
```
"""


MIN_ACCURACY = 0.9


def stage1_text(cfg: dict, summary: dict) -> str:
    if not cfg.get("vision_steps"):
        return ""
    split = (f": shapes {summary['vision_accuracy_shape']:.0%}, digits {summary['vision_accuracy_digit']:.0%}"
             if "vision_accuracy_digit" in summary else "")
    frozen = ", the tower kept frozen from then on" if cfg.get("tower_lr") == 0 else ""
    return (f"{cfg['vision_steps']} steps of {cfg['vision_batch_size']} pictures teaching the vision module to "
            f"classify colour and content (training accuracy colour {summary['vision_accuracy_colour']:.0%}, "
            f"content {summary['vision_accuracy_content']:.0%}{split}){frozen}; then ")


def main(run: str, dest: str) -> int:
    run, dest = Path(run), Path(dest)
    if not (run / "summary.json").is_file():
        print(f"{run / 'summary.json'}: no such file (the output directory of `megrez train image-adapter`)",
              file=sys.stderr)
        return 1
    summary = json.loads((run / "summary.json").read_text())
    if summary["accuracy"] < MIN_ACCURACY:
        print(f"{run / 'summary.json'}: held-out accuracy {summary['accuracy']:.1%} is below "
              f"{MIN_ACCURACY:.0%}; {dest} not written", file=sys.stderr)
        return 1
    cfg = summary["config"]
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "final", dest)
    config = json.loads((dest / "config.json").read_text())
    import torch

    from megrez.models import build_model

    with torch.device("meta"):
        vision = sum(p.numel() for p in build_model(config).vision.parameters())
    per = ", ".join(f"{k.removeprefix('accuracy_')} {v:.1%}" for k, v in sorted(summary.items())
                    if k.startswith("accuracy_"))
    examples = "\n".join(f"expected {a!r:14s} answered {b!r}" for a, b in summary["examples"])
    (dest / "README.md").write_text(README.format(
        layers=cfg["vision"]["num_hidden_layers"], hidden=cfg["vision"]["hidden_size"], size=cfg["image_size"],
        query=cfg["query_num"], vision_params=f"{vision / 1e6:.2f}M", steps=summary["steps"],
        batch=cfg["batch_size"], seconds=summary["train_seconds"], loss=summary["final_loss"],
        n=summary["questions"], acc=summary["accuracy"], per=per, examples=examples,
        host=(f"fine-tuned with the adapter at lr {cfg['host_lr']:g}, so its text answers differ from the chat "
              "model's" if cfg.get("host_lr") else "frozen, unchanged"),
        stage1=stage1_text(cfg, summary)))
    print(f"wrote {dest} (held-out accuracy {summary['accuracy']:.1%})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m scripts.export_omni_asset RUN_DIR DEST_DIR")
    sys.exit(main(*sys.argv[1:]))
