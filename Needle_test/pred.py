"""Stage 2: run the model on every test prompt; resumable, keyed by everything that determines an answer.

    python Needle_test/pred.py [--config Needle_test/config-pred.yaml] [--model PATH]
        [--model_base_url URL --model_name NAME [--model_api chat|completions] [--tokenizer PATH]]
        [--chat_format auto|chatglm|llama|chat_template] [--trust_remote_code]
        [--prompt_dir DIR] [--save_file FILE] [--max_new_tokens N]

Reads the prompt set that prompt.py wrote (manifest.json). Appends one JSON line per prompt to
save_file as it finishes, with <save_file>.settings.json beside it (model and its fingerprint,
tokenizer, chat format, generation parameters, the prompt set's sha256, needle and question — eval.py
scores against these): a rerun under any other setting — a regenerated prompt set included — is
refused, never mixed. The config is checked first (longalign/eval/needle_test/config.py). Writes
<save_file>.stats.json (with the local model's position limit and the prompts beyond it, warned).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from longalign.eval.needle_test.config import PRED_SCHEMA, load_config, resolve
from longalign.eval.needle_test.needle import over_position_limit, position_limit
from longalign.eval.needle_test.prompt_set import needle_of, read_prompt_set
from longalign.eval.candidates import add_candidate_arguments, candidate_options, open_candidate, predict_all
from longalign.eval.generation import GenerationSettings, default_top_p
from longalign.eval.openai_api import AuthenticationFailed
from longalign.eval.prediction_keys import PredictionLog, prompt_sha256
from longalign.storage import write_json_atomic

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config-pred.yaml"
SUITE = "needle"
ORIGINAL_TEMPERATURE = 0.1  # the original needle scripts' sampling settings
ORIGINAL_MAX_NEW_TOKENS = 1024
ORIGINAL_SEED = 42


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    add_candidate_arguments(p)
    p.add_argument("--prompt_dir", default=None)
    p.add_argument("--save_file", default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    return p.parse_args(argv)


def model_defaults(config: dict, served_by_flag: bool) -> dict:
    """The config's model section as candidate options (the original's keys `model_name` for a local
    model and `family` are still read)."""
    section = dict(config.get("model") or {})
    if "family" in section:
        section.setdefault("chat_format", section.pop("family"))
    served = served_by_flag or bool(section.get("model_base_url"))
    if not served and "model" not in section and "model_name" in section:
        section["model"] = section.pop("model_name")
    return section


def position_check(candidate, prompts: list[dict], label: str) -> dict:
    """The local model's position limit and how many prompts exceed it (warned; None: unknown)."""
    config = getattr(candidate, "config", None)
    limit = position_limit(config.to_dict()) if config is not None else None
    over = over_position_limit(prompts, limit)
    if over:
        print(f"[pred] WARNING: {len(over)} of {len(prompts)} prompts are longer than {label}'s {limit} "
              f"positions (e.g. {over[0]}); they are predicted and counted (over_model_max_positions)",
              file=sys.stderr)
    return {"model_max_positions": limit, "over_model_max_positions": len(over)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    given = {"prompt_dir": args.prompt_dir, "save_file": args.save_file}
    config = load_config(args.config, PRED_SCHEMA, provided={key for key, value in given.items() if value})
    gen_cfg = config.get("generation", {})
    prompt_dir = Path(args.prompt_dir) if args.prompt_dir else resolve(config, config["prompt_dir"])
    save_file = Path(args.save_file) if args.save_file else resolve(config, config["save_file"])
    manifest, prompts = read_prompt_set(prompt_dir)
    options = candidate_options(args, model_defaults(config, bool(args.model_base_url)))
    candidate = open_candidate(options)
    top_p = gen_cfg.get("top_p")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens or int(gen_cfg.get("max_new_tokens", ORIGINAL_MAX_NEW_TOKENS)),
        temperature=float(gen_cfg.get("temperature", ORIGINAL_TEMPERATURE)),
        seed=int(gen_cfg.get("seed", ORIGINAL_SEED)),
        top_p=float(top_p) if top_p is not None else default_top_p(candidate.chat_format))
    record = {"suite": SUITE, "prompt_set_sha256": manifest["prompt_set_sha256"], "needle": needle_of(manifest),
              **candidate.settings_record(settings)}
    log = PredictionLog(save_file, record, id_field="id",
                        advice="pass another --save_file (or save_file in the config), or move "
                               f"{save_file} and its .settings.json away yourself")
    hashes = {p["id"]: prompt_sha256(p["prompt"]) for p in prompts}
    done, torn = log.load(hashes)
    todo = [(p["id"], p["prompt"], hashes[p["id"]]) for p in prompts if p["id"] not in done]
    stats = {"prompts": len(prompts), "already_done": len(done), "torn_bytes_dropped": torn,
             "settings_key": log.key, "prompt_set_sha256": manifest["prompt_set_sha256"],
             **position_check(candidate, prompts, options.label)}
    print(f"[pred] {options.label}: chat format {candidate.chat_format.name}; {len(done)} of {len(prompts)} "
          f"prompts already predicted; {len(todo)} to go")
    by_id = {p["id"]: p for p in prompts}
    stats.update(predict_all(candidate, log, todo, settings, options.model_concurrency,
                             extra=lambda i: {"context_length": by_id[i]["context_length"],
                                              "depth_percent": by_id[i]["depth_percent"], "model": options.label},
                             tag="pred"))
    write_json_atomic(save_file.with_name(save_file.name + ".stats.json"), stats)
    print(f"[pred] {stats}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, AuthenticationFailed) as err:  # the message says what to do
        sys.exit(f"[pred] ERROR: {err}")
