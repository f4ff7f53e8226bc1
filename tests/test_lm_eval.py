"""lm-eval-harness against the server as `wde serve` runs it (the engine in its own process), on small local
tasks: `local-completions` for loglikelihood, multiple-choice and generate_until tasks, `local-chat-completions`
for generate_until. Its loglikelihoods equal the engine's prompt log-probabilities; its generations equal the
offline API's greedy answers."""
import json
import math

import pytest

from wde import LLM, SamplingParams

lm_eval = pytest.importorskip("lm_eval")  # a test dependency (setup.cfg [test]); skipped only outside CI

QUESTIONS = [{"question": "What is the capital of France?", "answer": "Paris"},
             {"question": "What is the capital of Italy?", "answer": "Rome"}]
CHOICES = [{"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "label": 0},
           {"question": "Two plus two equals", "choices": ["three", "four"], "label": 1}]
TASKS = {
    "wde_ll": {"output_type": "loglikelihood", "data": "questions", "doc_to_text": "Q: {{question}}\nA:",
               "doc_to_target": " {{answer}}", "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    "wde_mc": {"output_type": "multiple_choice", "data": "choices", "doc_to_text": "{{question}}",
               "doc_to_choice": "{{choices}}", "doc_to_target": "label", "target_delimiter": " ",
               "metric_list": [{"metric": "acc"}]},
    "wde_gen": {"output_type": "generate_until", "data": "questions", "doc_to_text": "Q: {{question}}\nA:",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 12, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
}


@pytest.fixture(scope="module")
def tasks_folder(tmp_path_factory):
    """The tasks as lm-eval reads them: YAML files over local JSON-lines data (JSON is valid YAML)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("questions", QUESTIONS), ("choices", CHOICES)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for task, spec in TASKS.items():
        spec = {key: value for key, value in spec.items() if key != "data"}
        config = {"task": task, "dataset_path": "json", "test_split": "test",
                  "dataset_kwargs": {"data_files": {"test": str(folder / f"{TASKS[task]['data']}.jsonl")}}, **spec}
        (folder / f"{task}.yaml").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def served(served_smollm2):
    return served_smollm2[0]


@pytest.fixture(scope="module")
def reference(smollm2_reference, tmp_path_factory):
    """The offline API on the served model, and its tokenizer saved as a folder (lm-eval loads it by path)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    smollm2_reference.engine.tokenizer.hf.save_pretrained(folder)
    return smollm2_reference, str(folder)


def evaluate(model: str, url: str, tasks_folder, tasks: list[str], apply_chat_template: bool = False,
             **model_args) -> dict:
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=model, model_args={"model": "smollm2", "base_url": url, "max_retries": 1,
                                                            **model_args},
                                   tasks=tasks, task_manager=TaskManager(include_path=str(tasks_folder),
                                                                         include_defaults=False),
                                   log_samples=True, apply_chat_template=apply_chat_template)


def loglikelihood(llm: LLM, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval should compute: the continuation tokens' log-probabilities (split as lm-eval splits the
    text), and whether each was the most likely token."""
    tokenizer = llm.engine.tokenizer
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_len = len(tokenizer.encode(context, add_special_tokens=False))
    output = llm.generate([whole], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1), use_tqdm=False)[0]
    entries = [entry[token] for token, entry in zip(whole[context_len:], output.prompt_logprobs[context_len:])]
    return sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)


@pytest.fixture(scope="module", autouse=True)
def offline(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_local_completions_loglikelihoods_are_the_engines(served, reference, tasks_folder):
    llm, tokenizer_folder = reference
    results = evaluate("local-completions", f"{served}/v1/completions", tasks_folder, ["wde_ll", "wde_mc", "wde_gen"],
                       tokenizer_backend="huggingface", tokenizer=tokenizer_folder, num_concurrent=2, batch_size=2)
    checked = 0
    for task in ("wde_ll", "wde_mc"):
        for sample in results["samples"][task]:
            for (context, continuation), [(value, greedy)] in zip(sample["arguments"], sample["resps"]):
                expected, expected_greedy = loglikelihood(llm, context, continuation)
                assert value == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
                checked += 1
    assert checked == 2 + 5  # two loglikelihood documents, 3 + 2 choices
    assert math.isfinite(results["results"]["wde_ll"]["perplexity,none"])
    tokenizer = llm.engine.tokenizer
    for sample in results["samples"]["wde_gen"]:
        context, kwargs = sample["arguments"][0]
        expected = llm.generate([tokenizer.encode(context, add_special_tokens=False)],
                                SamplingParams(temperature=0, max_tokens=12, stop=kwargs["until"]),
                                use_tqdm=False)[0].outputs[0].text
        assert sample["resps"][0][0] == expected


def test_local_chat_completions_generate_as_the_engine_chats(served, reference, tasks_folder):
    llm, _ = reference
    results = evaluate("local-chat-completions", f"{served}/v1/chat/completions", tasks_folder, ["wde_gen"],
                       apply_chat_template=True)
    for sample in results["samples"]["wde_gen"]:
        context, kwargs = sample["arguments"][0]
        messages = json.loads(context.prompt)  # the conversation lm-eval sent, as JSON
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12, stop=kwargs["until"][:4]),
                            use_tqdm=False)[0].outputs[0].text
        assert sample["resps"][0][0] == expected and expected
