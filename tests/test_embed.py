"""Encoders against transformers: all-MiniLM-L6-v2 embeddings, random BERT / XLM-RoBERTa shapes with and
without classification heads, and results that do not depend on how inputs are batched."""
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from tests.encoder_models import write_encoder
from wde import LLM, PoolingParams
from wde.core.config import default_embed_model_path

WORDS = ("the quick brown fox jumps over a lazy dog while seven engines hum softly in the cold night air and "
         "nobody notices how the river bends toward the old stone bridge beyond the hills").split()


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def minilm():
    folder = default_embed_model_path()
    return LLM(model=folder, max_num_batched_tokens=512), AutoModel.from_pretrained(folder).eval(), \
        AutoTokenizer.from_pretrained(folder)


def mean_pooled(model, tokenizer, text: str) -> torch.Tensor:
    """What sentence-transformers computes for all-MiniLM-L6-v2: mean over tokens, then L2 norm."""
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state[0]
    return F.normalize(hidden.mean(0), dim=0)


def test_minilm_matches_transformers_and_its_pooling_config(minilm):
    llm, model, tokenizer = minilm
    texts = sentences(64)
    outputs = llm.embed(texts)  # batched: several inputs per step, up to 512 tokens a step
    for text, output in zip(texts, outputs):
        reference = mean_pooled(model, tokenizer, text)
        assert F.cosine_similarity(output.outputs.data, reference, dim=0) >= 0.9999
        assert output.outputs.data.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_minilm_ranks_pairs_as_the_reference_does(minilm):
    llm, model, tokenizer = minilm
    pairs = [("A man is eating food.", "A man is eating a piece of bread."),
             ("A man is eating food.", "The girl is carrying a baby."),
             ("A cheetah chases prey on a plain.", "A fast cat runs after an animal."),
             ("A cheetah chases prey on a plain.", "Someone is playing the guitar."),
             ("The new movie is awesome", "The new film is great")]
    ours = [float(a.outputs.data @ b.outputs.data) for a, b in
            zip(llm.embed([p[0] for p in pairs]), llm.embed([p[1] for p in pairs]))]
    theirs = [float(mean_pooled(model, tokenizer, a) @ mean_pooled(model, tokenizer, b)) for a, b in pairs]
    assert sorted(range(len(pairs)), key=ours.__getitem__) == sorted(range(len(pairs)), key=theirs.__getitem__)
    assert ours[0] > ours[1] and ours[2] > ours[3]


def test_dimensions_and_normalize(minilm):
    llm, _, _ = minilm
    full, cut, raw = (llm.embed(["hello there"], p)[0].outputs.data for p in
                      (PoolingParams(), PoolingParams(dimensions=32), PoolingParams(normalize=False)))
    assert cut.shape == (32,) and cut.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(F.normalize(raw, dim=0), full, atol=1e-6)
    assert torch.allclose(cut, F.normalize(raw[:32], dim=0), atol=1e-6)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    made = {}

    def make(family: str, num_labels: int | None = None) -> str:
        if (family, num_labels) not in made:
            made[family, num_labels] = str(write_encoder(tmp_path_factory.mktemp(family), family, num_labels))
        return made[family, num_labels]
    return make


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("budget", [64, 4096])
def test_random_encoder_hidden_states_match_transformers(encoders, family, budget):
    folder = encoders(family)
    texts = sentences(12, seed=1)
    llm = LLM(model=folder, max_num_batched_tokens=budget)
    outputs = llm.embed(texts, PoolingParams(normalize=False))  # [CLS] / <s>: the family's pooling
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    for text, output in zip(texts, outputs):
        with torch.no_grad():
            reference = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, 0]
        assert (output.outputs.data - reference).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_random_classifier_matches_transformers(encoders, family):
    folder = encoders(family, num_labels=3)
    texts = sentences(10, seed=2)
    llm = LLM(model=folder, task="classify", max_num_batched_tokens=128)
    outputs = llm.classify(texts)
    raw = llm.classify(texts, PoolingParams(activation=False))
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(folder).eval(), \
        AutoTokenizer.from_pretrained(folder)
    for text, output, logits in zip(texts, outputs, raw):
        with torch.no_grad():
            reference = model(**tokenizer(text, return_tensors="pt")).logits[0]
        assert (logits.outputs.data - reference).abs().max() < 1e-4
        assert (output.outputs.data - reference.softmax(-1)).abs().max() < 1e-5
        assert output.outputs.num_classes == 3


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_random_cross_encoder_scores_match_transformers(encoders, family):
    folder = encoders(family, num_labels=1)
    query, documents = "where does the river bend", sentences(8, seed=3)
    llm = LLM(model=folder, max_num_batched_tokens=96)  # architecture ...ForSequenceClassification: score
    outputs = llm.score(query, documents)
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(folder).eval(), \
        AutoTokenizer.from_pretrained(folder)
    for document, output in zip(documents, outputs):
        with torch.no_grad():
            encoded = tokenizer(query, document, return_tensors="pt", return_token_type_ids=family == "bert")
            logit = model(**encoded).logits[0, 0]
        assert output.outputs.score == pytest.approx(torch.sigmoid(logit).item(), abs=1e-5)


def test_results_do_not_depend_on_batch_composition(encoders):
    folder = encoders("bert")
    texts = sentences(30, seed=4)
    alone = LLM(model=folder, max_num_seqs=1).embed(texts)
    packed = LLM(model=folder, max_num_batched_tokens=200, max_num_seqs=7).embed(list(reversed(texts)))[::-1]
    for a, b in zip(alone, packed):
        assert (a.outputs.data - b.outputs.data).abs().max() < 1e-5


def test_a_batch_leaves_the_collector_as_it_found_it():
    """LLM batches hold off full collections while they run (they walk the whole engine); afterwards the
    thresholds are back, a caller's gc.freeze() stands, and an engine that is dropped is collected."""
    import gc
    import weakref
    thresholds = gc.get_threshold()
    llm = LLM(model=default_embed_model_path())
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        llm.embed(["a text"] * 8)
        with pytest.raises(ValueError):
            llm.embed(["fine", ""])  # an empty prompt: refused while the batch is being submitted
        assert gc.get_threshold() == thresholds and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    engine = weakref.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None
