"""Needle_test/: exact context lengths, depth and sentence-boundary placement with two different
tokenizers, prompt sets replaced as a unit, keyed and resumable pred, match scorer, judge on a loopback
server (malformed replies, timeouts, a refused key), heatmap PNG."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from helpers.fake_openai_server import FakeOpenAIServer
from Needle_test import eval as needle_eval, pred as needle_pred, prompt as needle_prompt, vis as needle_vis
from longalign.eval.needle_test.config import EVAL_SCHEMA, PRED_SCHEMA, PROMPT_SCHEMA, NeedleConfigError, load_config
from longalign.eval.needle_test.needle import (build_context, context_lengths, depth_percents, encode, haystack_ids,
                                read_haystack, sentence_end_patterns)
from longalign.eval.needle_test.prompt_set import PromptSetError
from longalign.eval.needle_test.scoring import JUDGE_PROMPT_SHA256, match_score
from longalign.remote_code import RemoteCodeRequired
from longalign.eval.openai_api import AuthenticationFailed
from longalign.eval.prediction_keys import PredictionLog, PredictionMismatch, prompt_sha256
from longalign.storage import OUTPUT_MARKER, read_jsonl
from longalign.demo.tiny_model import save_tiny_model
from helpers.line_separators import LINE_SEPARATORS
from helpers.tiny_llama import TEST_SHAPE, save_tiny_llama

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
FACTS = ["eat a sandwich", "Dolores Park", "sunny day"]
SHARED_HAYSTACK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "haystack"


def haystack_text(n=120):
    words = ["river", "mountain", "paper", "engine", "garden", "window", "market", "signal"]
    parts = []
    for i in range(n):
        parts.append(f"Sentence {i} talks about the {words[i % 8]} and the {words[(i * 3) % 8]} near town.")
        if i % 5 == 4:
            parts.append(f"这是第{i}句话，讲的是{words[i % 8]}。")
    return " ".join(parts)


@pytest.fixture(scope="module")
def haystack_dir(tmp_path_factory):
    if SHARED_HAYSTACK.is_dir():
        return SHARED_HAYSTACK
    out = tmp_path_factory.mktemp("haystack")
    for k in range(3):
        (out / f"essay{k}.txt").write_text(haystack_text(60 + k), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def unigram_tokenizer(tmp_path_factory):
    """A second, different tokenizer: SentencePiece-style Unigram with a Metaspace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    tok.train_from_iterator([haystack_text(), NEEDLE, QUESTION] * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("unigram")
    fast.save_pretrained(str(out))
    return fast


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("needle_model"))


def test_lengths_and_depths_from_config():
    assert context_lengths({"min_len": 1000, "max_len": 3000, "count": 3}) == [1000, 2000, 3000]
    assert context_lengths({"list": [500, 200, 500]}) == [200, 500]
    linear = depth_percents({"min_percent": 0, "max_percent": 100, "count": 5})
    assert linear == [0, 25, 50, 75, 100] and all(type(d) is float for d in linear)  # JSON-safe
    sig = depth_percents({"min_percent": 0, "max_percent": 100, "count": 5, "interval_type": "sigmoid"})
    assert sig[0] == 0 and sig[-1] == 100 and sig[1] < 25 and sig[3] > 75
    with pytest.raises(ValueError, match="linear or sigmoid"):
        depth_percents({"min_percent": 0, "max_percent": 100, "count": 3, "interval_type": "log"})


def test_missing_haystack_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="haystack_dir.*README"):
        read_haystack(tmp_path / "PaulGrahamEssays")
    with pytest.raises(FileNotFoundError, match="no haystack directory"):
        read_haystack(None)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["bpe", "unigram"])
def test_exact_length_depth_and_sentence_boundary(which, tiny_tokenizer, unigram_tokenizer):
    tokenizer = tiny_tokenizer if which == "bpe" else unigram_tokenizer
    ends = sentence_end_patterns(tokenizer)
    for sentence_end in (".", "。"):
        text = f"alpha{sentence_end}"
        ids = encode(tokenizer, text)
        assert ends.ends_at(ids, len(ids)), f"{which}: {sentence_end!r} not recognised"
    hay = haystack_ids(tokenizer, haystack_text(), 1500)
    needle_ids = encode(tokenizer, NEEDLE)
    for depth in (0, 10, 33.3, 50, 90, 100):
        ids, start, found = build_context(hay, needle_ids, 900, depth, ends)
        assert len(ids) == 900 and ids[start:start + len(needle_ids)] == needle_ids
        target = int((900 - len(needle_ids)) * depth / 100)
        assert start <= target and target - start < 60, (which, depth, start, target)
        if 0 < depth < 100:
            assert found and tokenizer.decode(ids[:start]).rstrip()[-1] in ".。"


@pytest.mark.integration
def test_period_ids_come_from_each_tokenizer(tiny_tokenizer, unigram_tokenizer):
    bpe, uni = sentence_end_patterns(tiny_tokenizer), sentence_end_patterns(unigram_tokenizer)
    assert bpe.ids and uni.ids and bpe.ids != uni.ids
    for tokenizer, ends in ((tiny_tokenizer, bpe), (unigram_tokenizer, uni)):
        assert all(set(tokenizer.decode([i]).strip()) <= set(".。．｡") for i in ends.ids)


def write_config(path, body):
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return str(path)


def prompt_config(tmp_path, tokenizer_dir, haystack_dir, lengths=(300, 600), depths=(0, 50, 100)):
    return write_config(tmp_path / "config-prompt.yaml", {
        "prompt": {"needle": NEEDLE, "haystack_dir": str(haystack_dir), "retrieval_question": QUESTION},
        "context": {"list": list(lengths)}, "document_depth": {"list": list(depths)},
        "tokenizer": {"model_name": tokenizer_dir}, "final_context_buffer": 40, "save_dir": "prompts"})


def test_prompt_files_fit_their_length(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, haystack_dir):
    stats = needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir)])
    files = sorted((tmp_path / "prompts").glob("len*.json"))
    assert stats["written"] == len(files) == 6 and stats["over_length"] == 0
    manifest = json.loads((tmp_path / "prompts" / "manifest.json").read_text())
    assert sorted(manifest["prompts"]) == sorted(f.stem for f in files)
    assert manifest["prompt_set_sha256"] == stats["prompt_set_sha256"]
    for f in files:
        record = json.loads(f.read_text())
        assert record["context_tokens"] == record["context_length"] - 40
        assert record["context_length"] - 40 < record["prompt_tokens"] <= record["context_length"]
        assert len(encode(tiny_tokenizer, record["prompt"])) == record["prompt_tokens"]
        assert NEEDLE.strip() in record["prompt"] and record["prompt"].endswith(QUESTION)
        assert manifest["prompts"][f.stem] == prompt_sha256(record["prompt"])
    with pytest.raises(FileNotFoundError, match="haystack"):
        needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, tmp_path / "none")])


def test_prompt_folder_is_replaced_as_a_unit(tmp_path, tiny_tokenizer_dir, haystack_dir):
    """The audit: regenerating with new lengths left the old prompt files beside the new ones."""
    needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (300, 600))])
    needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (50,))])
    assert sorted(p.name for p in (tmp_path / "prompts").iterdir() if p.name != OUTPUT_MARKER) == [
        "len200_depth50.00.json", "manifest.json", "stats.json"]  # the marker: longalign.storage
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PromptSetError, match="not written by prompt.py"):
        needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,)),
                            "--save_dir", str(foreign)])
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_remote_code_tokenizer_needs_the_flag(tmp_path, tiny_tokenizer_dir, haystack_dir):
    import shutil

    tok = tmp_path / "remote_tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    (tok / "tokenization_rtok.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\nclass RTokTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="RTokTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_rtok.RTokTokenizer"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    argv = ["--config", prompt_config(tmp_path, str(tok), haystack_dir, (200,), (50,))]
    with pytest.raises(RemoteCodeRequired, match="pass --trust_remote_code"):
        needle_prompt.main(argv)
    assert needle_prompt.main(argv + ["--trust_remote_code"])["written"] == 1


def pred_config(tmp_path, model_dir, temperature=0.1, save_file="pred/preds.jsonl"):
    return write_config(tmp_path / "config-pred.yaml", {
        "model": {"model": model_dir}, "generation": {"max_new_tokens": 3, "temperature": temperature},
        "prompt_dir": "prompts", "save_file": save_file})


def test_pred_is_resumable(tmp_path, tiny_tokenizer_dir, tiny_llama_dir, haystack_dir, monkeypatch):
    from longalign.eval.generation import LocalModel

    needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (0, 50, 100))])
    config = pred_config(tmp_path, tiny_llama_dir)
    real, calls = LocalModel.respond, []

    def crash_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LocalModel, "respond", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        needle_pred.main(["--config", config])
    first = read_jsonl(tmp_path / "pred" / "preds.jsonl")
    assert len(first) == 1
    monkeypatch.setattr(LocalModel, "respond", real)
    stats = needle_pred.main(["--config", config])
    assert (stats["already_done"], stats["predicted_now"]) == (1, 2)
    records = read_jsonl(tmp_path / "pred" / "preds.jsonl")
    assert records[0] == first[0] and sorted(r["id"] for r in records) == sorted(
        ["len200_depth0.00", "len200_depth50.00", "len200_depth100.00"])
    assert needle_pred.main(["--config", config])["predicted_now"] == 0
    # the original config's keys (model_name for a local model, family) still work
    legacy = write_config(tmp_path / "legacy.yaml", {"model": {"model_name": tiny_llama_dir, "family": None},
                                                     "generation": {"max_new_tokens": 3, "temperature": 0.1},
                                                     "prompt_dir": "prompts", "save_file": "pred/preds.jsonl"})
    assert needle_pred.main(["--config", legacy])["already_done"] == 3


def test_pred_refuses_stale_predictions(tmp_path, tiny_tokenizer_dir, tiny_llama_dir, haystack_dir):
    """The audit: a new needle or new lengths reused the old predictions."""
    needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (50,))])
    needle_pred.main(["--config", pred_config(tmp_path, tiny_llama_dir)])
    before = (tmp_path / "pred" / "preds.jsonl").read_text()
    with pytest.raises(PredictionMismatch, match="generation.temperature: 0.1 -> 0.5"):
        needle_pred.main(["--config", pred_config(tmp_path, tiny_llama_dir, temperature=0.5)])
    with pytest.raises(PredictionMismatch, match="chat_format"):
        needle_pred.main(["--config", pred_config(tmp_path, tiny_llama_dir), "--chat_format", "chatglm"])
    config = yaml.safe_load(Path(prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (50,))).read_text())
    config["prompt"]["needle"] = "\nThe secret word is pineapple.\n"
    needle_prompt.main(["--config", write_config(tmp_path / "config-prompt.yaml", config)])
    with pytest.raises(PredictionMismatch, match="prompt_set_sha256"):
        needle_pred.main(["--config", pred_config(tmp_path, tiny_llama_dir)])
    assert (tmp_path / "pred" / "preds.jsonl").read_text() == before
    fresh = needle_pred.main(["--config", pred_config(tmp_path, tiny_llama_dir, save_file="pred/new.jsonl")])
    assert fresh["predicted_now"] == 1


def test_match_scorer_on_known_answers():
    assert match_score("Eat a sandwich and sit in Dolores Park on a sunny day.", FACTS) == (10.0, FACTS)
    assert match_score("eat a  SANDWICH in dolores park, at night", FACTS)[0] == 7.0
    assert match_score("Go to the Golden Gate Bridge.", FACTS) == (1.0, [])
    assert match_score("sit in Dolores Parkway", FACTS)[0] == 1.0  # whole words only
    with pytest.raises(ValueError, match="key_facts"):
        match_score("anything", [])


SETTINGS = {"suite": "needle", "prompt_set_sha256": "ab" * 32, "chat_format": {"name": "llama"},
            "candidate": {"kind": "local", "model": "/models/test"},
            "needle": {"needle": NEEDLE, "retrieval_question": QUESTION}}


def write_predictions(path, answers, duplicate=None, settings=SETTINGS):
    """Predictions as pred.py writes them (settings beside them), optionally one id twice."""
    log = PredictionLog(path, settings, id_field="id", advice="test")
    items = list(answers.items()) + ([duplicate] if duplicate else [])
    for (length, depth), answer in items:
        log.append(f"len{length}_depth{depth:.2f}", prompt_sha256(answer), {
            "context_length": length, "depth_percent": depth, "response": answer})


def eval_config(tmp_path, scorer, key_facts=FACTS, **judge):
    return write_config(tmp_path / "config-eval.yaml", {
        "pred_file": "pred/preds.jsonl", "save_dir": "results", "scorer": scorer,
        "judge": {"model_name": "judge-x", "concurrency": 2, "backoff_s": 0, **judge}, "key_facts": key_facts})


ANSWERS = {(100, 0.0): "ANS-A eat a sandwich in Dolores Park on a sunny day", (100, 50.0): "ANS-B Dolores Park",
           (200, 0.0): "ANS-C no idea", (200, 50.0): "ANS-D eat a sandwich, sunny day"}


def test_eval_match_and_heatmap(tmp_path):
    write_predictions(tmp_path / "pred" / "preds.jsonl", ANSWERS)
    summary = needle_eval.main(["--config", eval_config(tmp_path, "match")])
    assert summary["mean_score"] == pytest.approx((10 + 4 + 1 + 7) / 4) and summary["missing"] == 0
    assert (summary["model"], summary["prompt_set_sha256"], summary["judge_model"]) == ("/models/test", "ab" * 32, None)
    out = needle_vis.main(["--config", str(tmp_path / "config-eval.yaml"), "--scorer", "match"])
    assert out == tmp_path / "results" / "heatmap_match.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_eval_refuses_duplicates_and_unkeyed_predictions(tmp_path):
    """The audit: a duplicate id paired a score with the wrong answer under concurrency."""
    write_predictions(tmp_path / "pred" / "preds.jsonl", ANSWERS, duplicate=((100, 0.0), "ANS-Z other answer"))
    with pytest.raises(PredictionMismatch, match="duplicate id 'len100_depth0.00'"):
        needle_eval.main(["--config", eval_config(tmp_path, "match")])
    (tmp_path / "pred" / "preds.jsonl.settings.json").unlink()
    with pytest.raises(PredictionMismatch, match="no preds.jsonl.settings.json"):
        needle_eval.main(["--config", eval_config(tmp_path, "match")])


def test_eval_judge_on_loopback_server(tmp_path, monkeypatch):
    write_predictions(tmp_path / "pred" / "preds.jsonl", ANSWERS)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    rules = [("ANS-A", [{"status": 200, "content": "Accurate. [[10]]"}]),
             ("ANS-B", [{"status": 429, "retry_after": "90"}, {"status": 200, "content": "[[5]]"}]),
             ("ANS-C", [{"body": "{truncated", "content_type": "application/json"},
                        {"status": 200, "content": "Unrelated. [[1]]"}]),
             ("ANS-D", [{"status": 200, "content": "like \"Rating: [[5]]\"; mine: [[-1]]"}])]
    with FakeOpenAIServer(rules) as server:
        summary = needle_eval.main(["--config", eval_config(tmp_path, "judge", max_backoff_s=0.01),
                                    "--judge_base_url", server.base_url])
        user = next(r for r in server.requests if "ANS-A" in r["messages"][-1]["content"])["messages"][-1]["content"]
    assert summary["mean_score"] == pytest.approx((10 + 5 + 1) / 3) and summary["missing"] == 1
    assert (summary["judge_model"], summary["runs"], summary["judge_prompt_sha256"]) == ("judge-x", 1, JUDGE_PROMPT_SHA256)
    assert NEEDLE.strip() in user and QUESTION in user and "Score 10" in user
    results = json.loads((tmp_path / "results" / "results_judge.json").read_text())
    assert results["len200_depth50.00"]["score"] is None and "no [[rating]]" in results["len200_depth50.00"]["error"]
    assert results["len100_depth50.00"]["prediction"] == "ANS-B Dolores Park"  # each score with its own answer
    assert needle_vis.main(["--config", str(tmp_path / "config-eval.yaml")]).is_file()


def test_eval_judge_timeout_flag_and_refused_key(tmp_path, monkeypatch):
    write_predictions(tmp_path / "pred" / "preds.jsonl", ANSWERS)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAIServer([("ANS-A", [{"status": 200, "content": "[[9]]", "delay_s": 5}])],
                          default={"status": 200, "content": "[[2]]"}) as server:
        summary = needle_eval.main(["--config", eval_config(tmp_path, "judge"), "--judge_base_url", server.base_url,
                                    "--judge_timeout_s", "0.3", "--judge_max_attempts", "1"])
    assert (summary["scored"], summary["missing"], summary["mean_score"]) == (3, 1, 2.0)
    with FakeOpenAIServer([], default={"status": 403, "delay_s": 0.1}) as server:
        with pytest.raises(AuthenticationFailed):
            needle_eval.main(["--config", eval_config(tmp_path, "judge", concurrency=1),
                              "--save_dir", str(tmp_path / "other"), "--judge_base_url", server.base_url])
        assert len(server.requests) == 1


OTHER_NEEDLE = "\nThe secret word is pineapple.\n"
OTHER_QUESTION = "What is the secret word?"


def test_eval_scores_against_the_needle_the_prompts_were_built_with(tmp_path, tiny_tokenizer_dir, tiny_llama_dir,
                                                                    haystack_dir, monkeypatch):
    """The audit: eval.py judged against config-eval.yaml's needle, not the prompt set's: correct
    answers about another needle scored, exit 0."""
    config = yaml.safe_load(Path(prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (50,))).read_text())
    config["prompt"].update(needle=OTHER_NEEDLE, retrieval_question=OTHER_QUESTION)
    needle_prompt.main(["--config", write_config(tmp_path / "config-prompt.yaml", config)])
    needle_pred.main(["--config", pred_config(tmp_path, tiny_llama_dir)])
    settings = json.loads((tmp_path / "pred" / "preds.jsonl.settings.json").read_text())["settings"]
    assert settings["needle"] == {"needle": OTHER_NEEDLE, "retrieval_question": OTHER_QUESTION}
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAIServer([], default={"status": 200, "content": "[[4]]"}) as server:
        summary = needle_eval.main(["--config", eval_config(tmp_path, "judge"), "--judge_base_url", server.base_url])
        asked = server.requests[0]["messages"][-1]["content"]
    assert "pineapple" in asked and "Dolores" not in asked and OTHER_QUESTION in asked
    assert (summary["needle"], summary["retrieval_question"]) == (OTHER_NEEDLE, OTHER_QUESTION)
    # a config that names another needle (the old config-eval.yaml's) is refused, naming both
    body = yaml.safe_load(Path(eval_config(tmp_path, "judge")).read_text())
    body["prompt"] = {"needle": NEEDLE, "retrieval_question": QUESTION}
    with pytest.raises(ValueError, match=r"config-eval.yaml: prompt.needle is .*Dolores.*made with .*pineapple"):
        needle_eval.main(["--config", write_config(tmp_path / "config-eval.yaml", body)])
    with pytest.raises(ValueError, match=r"key_facts: \['eat a sandwich'.* do not occur in the needle .*pineapple"):
        needle_eval.main(["--config", eval_config(tmp_path, "match")])
    assert needle_eval.main(["--config", eval_config(tmp_path, "match", key_facts=["pineapple"])])["scored"] == 1


def test_predictions_of_an_older_pred_are_scored_only_with_their_prompt_set(tmp_path, tiny_tokenizer_dir,
                                                                            haystack_dir):
    needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (50,))])
    manifest = json.loads((tmp_path / "prompts" / "manifest.json").read_text())
    old = {key: value for key, value in SETTINGS.items() if key != "needle"}
    write_predictions(tmp_path / "pred" / "preds.jsonl", ANSWERS, settings=old)
    with pytest.raises(ValueError, match="does not record the needle.*--prompt_dir"):
        needle_eval.main(["--config", eval_config(tmp_path, "match")])
    with pytest.raises(ValueError, match="prompt set in .*prompts .* is not theirs"):
        needle_eval.main(["--config", eval_config(tmp_path, "match"), "--prompt_dir", str(tmp_path / "prompts")])
    write_predictions(tmp_path / "pred2" / "preds.jsonl", ANSWERS,
                      settings={**old, "prompt_set_sha256": manifest["prompt_set_sha256"]})
    summary = needle_eval.main(["--config", eval_config(tmp_path, "match"), "--prompt_dir", str(tmp_path / "prompts"),
                                "--pred_file", str(tmp_path / "pred2" / "preds.jsonl")])
    assert summary["needle"] == NEEDLE and summary["mean_score"] == pytest.approx((10 + 4 + 1 + 7) / 4)


@pytest.mark.parametrize("separator", LINE_SEPARATORS)
def test_a_line_separator_in_answers_and_judge_replies_resumes(tmp_path, tiny_tokenizer_dir, haystack_dir,
                                                               monkeypatch, separator):
    """The audit: an answer with U+2028 cut its record in two: every later pred, eval failed."""
    needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (200,), (0, 50))])
    config = write_config(tmp_path / "config-pred.yaml", {
        "model": {"model_name": "served"}, "generation": {"max_new_tokens": 3}, "prompt_dir": "prompts",
        "save_file": "pred/preds.jsonl"})
    answer = f"Eat a sandwich{separator}in Dolores Park on a sunny day"
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeOpenAIServer([], default={"status": 200, "content": answer}) as model, \
            FakeOpenAIServer([], default={"status": 200, "content": f"Accurate.{separator}[[9]]"}) as judge:
        served = ["--config", config, "--model_base_url", model.base_url]
        assert needle_pred.main(served)["predicted_now"] == 2
        again = needle_pred.main(served)
        judged = [needle_eval.main(["--config", eval_config(tmp_path, "judge"), "--judge_base_url", judge.base_url])
                  for _ in range(2)]
        asked = (len(model.requests), len(judge.requests))
    assert (again["already_done"], again["predicted_now"], asked) == (2, 0, (2, 2))  # nothing asked twice
    assert [s["mean_score"] for s in judged] == [9.0, 9.0]
    assert {r["response"] for r in read_jsonl(tmp_path / "pred" / "preds.jsonl")} == {answer}
    assert needle_eval.main(["--config", eval_config(tmp_path, "match")])["mean_score"] == 10.0


BAD_PROMPT_CONFIGS = [  # (change to the prompt config, what the error names)
    (lambda c: c["document_depth"].update(interval_typ="sigmoid"),
     r"document_depth.interval_typ: unknown key \(did you mean interval_type\?\)"),
    (lambda c: c["prompt"].pop("needle"), r"prompt.needle: missing"),
    (lambda c: c["context"].update(list=1000), r"context.list: expected a list of int values, got int 1000"),
    (lambda c: c.update(context={"min_len": 100, "max_len": 200, "count": 0}), r"context.count: must be >= 1, got 0"),
    (lambda c: c.update(context={"min_len": 100, "list": None}),
     r"context.max_len, context.count: missing \(needed when context.list is not given\)"),
    (lambda c: c["document_depth"].update(list=[10, 150]), r"document_depth.list: must be >= 0 and <= 100, got 150"),
    (lambda c: c.update(final_context_buffer="40"), r"final_context_buffer: expected int, got str '40'"),
    (lambda c: c.update(tokenizer="gpt2"), r"tokenizer: must be a section \(a mapping\), got str 'gpt2'"),
    (lambda c: c.pop("context"), r"context: missing \(a list, or min_len, max_len and count\)"),
    (lambda c: c.update(document_depth={"min_percent": 90, "max_percent": 10, "count": 3}),
     r"document_depth.min_percent: 90 is above document_depth.max_percent \(10\)"),
]


@pytest.mark.parametrize("change, message", BAD_PROMPT_CONFIGS)
def test_prompt_config_errors_name_the_file_and_key(tmp_path, tiny_tokenizer_dir, haystack_dir, change, message):
    """The audit: a typo was ignored (depths fell back to linear); a missing key, a scalar for a list or
    count 0 gave tracebacks or `max() arg is an empty sequence`."""
    config = yaml.safe_load(Path(prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir)).read_text())
    change(config)
    path = write_config(tmp_path / "config-prompt.yaml", config)
    with pytest.raises(NeedleConfigError, match=message) as err:
        needle_prompt.main(["--config", path])
    assert str(err.value).startswith(f"{path}: ")
    assert not (tmp_path / "prompts").exists()


def test_pred_and_eval_config_errors_name_the_file_and_key(tmp_path, tiny_llama_dir):
    pred = yaml.safe_load(Path(pred_config(tmp_path, tiny_llama_dir)).read_text())
    pred["generation"].update(temperature="hot", max_new_token=5)
    pred["model"]["chat_format"] = "vicuna"
    path = write_config(tmp_path / "config-pred.yaml", pred)
    with pytest.raises(NeedleConfigError, match=r"3 problem\(s\)") as err:
        needle_pred.main(["--config", path])
    for part in (f"{path}: ", "model.chat_format: must be one of auto, chatglm, llama, chat_template, got 'vicuna'",
                 "generation.max_new_token: unknown key (did you mean max_new_tokens?)",
                 "generation.temperature: expected number, got str 'hot'"):
        assert part in str(err.value), part
    del pred["save_file"], pred["generation"]["temperature"], pred["generation"]["max_new_token"], pred["model"]["chat_format"]
    with pytest.raises(NeedleConfigError, match="save_file: missing"):
        needle_pred.main(["--config", write_config(tmp_path / "config-pred.yaml", pred)])
    body = yaml.safe_load(Path(eval_config(tmp_path, "exact", concurrency=0)).read_text())
    body["key_facts"] = "Dolores Park"
    path = write_config(tmp_path / "config-eval.yaml", body)
    for main in (needle_eval.main, needle_vis.main):
        with pytest.raises(NeedleConfigError) as err:
            main(["--config", path])
        for part in (f"{path}: ", "scorer: must be one of judge, match, got 'exact'",
                     "judge.concurrency: must be >= 1, got 0", "key_facts: expected a list of str values"):
            assert part in str(err.value), part


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not JSON"), ("[1, 2]", "expected a non-empty mapping"),
    ('{"len100_depth0.00": {"context_length": 100, "depth_percent": 0}}', "score is 'missing'"),
    ('{"len100_depth0.00": {"context_length": "100", "depth_percent": 0, "score": 5}}', "context_length is '100'")])
def test_vis_names_a_corrupt_results_file(tmp_path, content, problem):
    results = tmp_path / "results_match.json"
    results.write_text(content)
    with pytest.raises(ValueError, match=f"{results}: not a results file of Needle_test/eval.py .*{problem}"):
        needle_vis.main(["--config", eval_config(tmp_path, "match"), "--results", str(results)])


def test_prompts_longer_than_the_model_are_warned_and_counted(tmp_path, tiny_tokenizer_dir, haystack_dir, capsys):
    """The audit: prompts beyond max_position_embeddings were generated without a word."""
    shape = dataclasses.replace(TEST_SHAPE, max_positions=256)
    model = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "short_model", shape)["out"]
    stats = needle_prompt.main(["--config", prompt_config(tmp_path, model, haystack_dir, (200, 300), (50,))])
    assert (stats["model_max_positions"], stats["over_model_max_positions"]) == (256, 1)
    assert json.loads((tmp_path / "prompts" / "stats.json").read_text())["over_model_max_positions"] == 1
    assert "WARNING: 1 prompts are longer than the model's 256 positions" in capsys.readouterr().err
    pred = needle_pred.main(["--config", pred_config(tmp_path, model), "--max_new_tokens", "1"])
    assert (pred["model_max_positions"], pred["over_model_max_positions"]) == (256, 1)
    assert "WARNING: 1 of 2 prompts are longer than" in capsys.readouterr().err
    stats = needle_prompt.main(["--config", prompt_config(tmp_path, tiny_tokenizer_dir, haystack_dir, (300,), (50,))])
    assert (stats["model_max_positions"], stats["over_model_max_positions"]) == (None, 0)  # a tokenizer alone
    assert "no config.json" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    folder = Path(needle_prompt.__file__).parent
    for name, schema in (("config-prompt.yaml", PROMPT_SCHEMA), ("config-pred.yaml", PRED_SCHEMA),
                         ("config-eval.yaml", EVAL_SCHEMA)):
        assert load_config(folder / name, schema)["_dir"] == str(folder)


def test_the_judge_reads_the_configured_question_as_the_original_did(tmp_path, monkeypatch):
    """The original's judge saw its config's question (short), not necessarily the prompt's."""
    write_predictions(tmp_path / "pred" / "preds.jsonl", {(100, 0.0): "ANS-A eat a sandwich"})
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    short = "Best thing to do in San Francisco?"
    with FakeOpenAIServer([("ANS-A", [{"status": 200, "content": "[[9]]"}] * 2)]) as server:
        needle_eval.main(["--config", eval_config(tmp_path, "judge", question=short), "--judge_base_url", server.base_url])
        asked = server.requests[-1]["messages"][-1]["content"]
    assert f"[Question]\n{short}\n" in asked and QUESTION != short
    with FakeOpenAIServer([("ANS-A", [{"status": 200, "content": "[[9]]"}] * 2)]) as server:
        needle_eval.main(["--config", eval_config(tmp_path, "judge", question=None), "--save_dir",
                          str(tmp_path / "asked"), "--judge_base_url", server.base_url])
        asked = server.requests[-1]["messages"][-1]["content"]
    assert f"[Question]\n{QUESTION}\n" in asked
