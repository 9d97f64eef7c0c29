"""Stage 2: run the model on every test prompt; resumable (finished ids are skipped).

    python Needle_test/pred.py [--config Needle_test/config-pred.yaml] [--model PATH]
        [--prompt_dir DIR] [--save_file FILE] [--max_new_tokens N]

Appends one JSON line per prompt to save_file as it finishes; writes <save_file>.stats.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from needle import load_config, resolve
from longalign.storage import append_jsonl, drop_torn_tail, read_jsonl, write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-pred.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--model", default=None, help="overrides model.model_name")
    p.add_argument("--prompt_dir", default=None)
    p.add_argument("--save_file", default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    return p.parse_args(argv)


def load_prompts(prompt_dir: Path) -> list[dict]:
    files = sorted(f for f in prompt_dir.glob("len*_depth*.json"))
    if not files:
        raise FileNotFoundError(f"no prompt files in {prompt_dir}; run Needle_test/prompt.py first")
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def main(argv=None) -> dict:
    from longalign import generation

    args = parse_args(argv)
    config = load_config(args.config)
    model_cfg, gen_cfg = config["model"], config.get("generation", {})
    prompt_dir = Path(args.prompt_dir) if args.prompt_dir else resolve(config, config["prompt_dir"])
    save_file = Path(args.save_file) if args.save_file else resolve(config, config["save_file"])
    prompts = load_prompts(prompt_dir)
    torn = drop_torn_tail(save_file)
    done = {r["id"] for r in read_jsonl(save_file)}
    todo = [p for p in prompts if p["id"] not in done]
    stats = {"prompts": len(prompts), "already_done": len(done & {p["id"] for p in prompts}),
             "predicted_now": 0, "torn_bytes_dropped": torn}
    print(f"[pred] {stats['already_done']} of {len(prompts)} prompts already predicted; {len(todo)} to go")
    if todo:
        model_name = args.model or model_cfg["model_name"]
        model, tokenizer, family = generation.load_model_and_tokenizer(
            model_name, model_cfg.get("family"), model_cfg.get("dtype", "auto"))
        settings = generation.GenerationSettings(
            max_new_tokens=args.max_new_tokens or int(gen_cfg.get("max_new_tokens", 1024)),
            temperature=float(gen_cfg.get("temperature", 0.1)), seed=int(gen_cfg.get("seed", 42)))
        for prompt in todo:
            result = generation.generate_response(model, tokenizer, family, prompt["prompt"], settings)
            append_jsonl(save_file, {"id": prompt["id"], "context_length": prompt["context_length"],
                                     "depth_percent": prompt["depth_percent"], "model": model_name, **result})
            stats["predicted_now"] += 1
            print(f"[pred] {prompt['id']}: {result['response'][:80]!r}", flush=True)
    write_json_atomic(save_file.with_name(save_file.name + ".stats.json"), stats)
    print(f"[pred] {stats}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:  # bad input: the message says what to do
        sys.exit(f"[pred] ERROR: {err}")
