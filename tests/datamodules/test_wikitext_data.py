"""WikiText103DataModule: text sources, the tokenizer, sentence-order instances, the cache and MLM masking.

Everything runs on the synthetic stand-in (or copies of it without the marker, as "local WikiText files"):
the real reading code (``datasets``' text builder, the tokenizer, ``datasets.map``/``save_to_disk``) is exercised.
"""

from __future__ import annotations

import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from datamodules import WikiText103DataModule, write_synthetic_wikitext
from datamodules.albert_tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_digest, train_tokenizer
from datamodules.sentence_order import sentence_order_pairs, sentence_splitter, split_sentences_regex
from datamodules.synthetic_text import RAW_FILES
from lightning_btard.verifiable_batches import VerifiableCollate, VerifiableDataset, batch_keys, rebuild_batch

MAX_LEN = 128


def make_dm(data_dir: Path, **kw) -> WikiText103DataModule:
    args = dict(synthetic=True, train_tokenizer=True, tokenizer_vocab_size=600, max_seq_length=MAX_LEN, download=False)
    args.update(kw)
    return WikiText103DataModule(str(data_dir), **args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> WikiText103DataModule:
    dm = make_dm(tmp_path_factory.mktemp("wikitext"), synthetic_articles=120)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- sentence splitting and SOP pairs


@pytest.mark.parametrize(
    "text, expected",
    [
        (" The game began in 2010 . It was released in 2012 . ", ["The game began in 2010 .", "It was released in 2012 ."]),
        ("Dr. Smith arrived. He left! Did he? Yes.", ["Dr. Smith arrived.", "He left!", "Did he?", "Yes."]),
        ("J. R. R. Tolkien wrote it. The U.S. Army came. Then 3 more.", ["J. R. R. Tolkien wrote it.", "The U.S. Army came.", "Then 3 more."]),
        ('He said "Go." She went. (It rained.) Done', ['He said "Go."', "She went.", "(It rained.)", "Done"]),
        ("no capital after. so one sentence", ["no capital after. so one sentence"]),
        ("   ", []),
    ],
)
def test_regex_splitter(text, expected) -> None:
    assert split_sentences_regex(text) == expected


def test_punkt_splitter_splits_or_says_how_to_get_its_data() -> None:
    split = sentence_splitter("punkt")
    try:
        result = split("The first one. The second one.")
    except RuntimeError as e:  # nltk is installed; its punkt data is a separate download
        assert "python -m nltk.downloader punkt_tab" in str(e) and "sentence_splitter='regex'" in str(e)
    else:
        assert result == ["The first one.", "The second one."]
    with pytest.raises(ValueError, match="unknown sentence_splitter"):
        sentence_splitter("spacy")


def _chunks(lengths: list[int], max_len: int) -> list[list[int]]:
    """Independent statement of the chunking rule: cut after a sentence that brings the total to max_len, and at the end."""
    chunks, current, total = [], [], 0
    for i, n in enumerate(lengths):
        current.append(i)
        total += n
        if total >= max_len:
            chunks.append(current)
            current, total = [], 0
    if current:
        chunks.append(current)
    return chunks


def test_sentence_order_pairs_cut_whole_sentences_and_swap_half_the_time() -> None:
    rng = random.Random(0)
    swaps = total = 0
    for doc in range(600):
        n = rng.randint(1, 12)
        sentences = [f"s{doc}_{i}" for i in range(n)]
        lengths = [rng.randint(1, 30) for _ in range(n)]
        pairs = sentence_order_pairs(sentences, lengths, 64, random.Random(doc))
        expected = [[sentences[i] for i in chunk] for chunk in _chunks(lengths, 64) if len(chunk) > 1]
        assert len(pairs) == len(expected)
        for (a, b, label), chunk in zip(pairs, expected):
            assert a and b and label in (0, 1)
            assert (b + a if label else a + b) == chunk  # contiguous, in order, every sentence of the chunk once
            swaps += label
            total += 1
    assert total > 500
    assert abs(swaps / total - 0.5) < 4.5 * math.sqrt(0.25 / total)


# ---------------------------------------------------------------- text sources and the tokenizer


def test_synthetic_corpus_is_in_wikitext_raw_format(tmp_path) -> None:
    root = write_synthetic_wikitext(tmp_path / "w", n_train=3, n_valid=1, n_test=1)
    lines = (root / RAW_FILES["train"]).read_text().split("\n")
    assert sum(bool(re.fullmatch(r" = [A-Z][a-z]+ = ", line)) for line in lines) == 3  # one title per article
    assert sum(bool(re.fullmatch(r" = = [A-Z][a-z ]+ = = ", line)) for line in lines) == 9
    paragraphs = [line for line in lines if line.strip() and not line.startswith(" =")]
    assert len(paragraphs) == 9 and all(len(split_sentences_regex(p)) == 4 for p in paragraphs)
    assert (root / "SYNTHETIC").is_file()
    with pytest.raises(FileExistsError):  # never overwrites real text
        shutil.rmtree(root)
        root.mkdir()
        (root / RAW_FILES["train"]).write_text("real\n")
        write_synthetic_wikitext(root)


def test_missing_text_and_offline_hub_give_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="download=False.*synthetic=true"):
        WikiText103DataModule(str(tmp_path / "none"), download=False).prepare_data()
    # HF_HUB_OFFLINE=1 in the test environment: the hub cannot be reached
    with pytest.raises(FileNotFoundError, match="could not load Salesforce/wikitext/wikitext-103-raw-v1 .*Offline"):
        WikiText103DataModule(str(tmp_path / "none"), train_tokenizer=True).prepare_data()
    with pytest.raises(FileNotFoundError, match="train_tokenizer=true"):
        load_tokenizer("albert/albert-large-v2")
    with pytest.raises(ValueError, match="download=True"):
        WikiText103DataModule(str(tmp_path), synthetic=True, download=True)


def test_trained_tokenizer_is_albert_shaped_and_deterministic(tmp_path, prepared) -> None:
    texts = [line for line in (prepared.data_dir / RAW_FILES["train"]).read_text().split("\n")]
    a = train_tokenizer(texts, 600, tmp_path / "a")
    b = train_tokenizer(texts, 600, tmp_path / "b")
    assert tokenizer_digest(a) == tokenizer_digest(b)  # peers training it separately agree
    assert tokenizer_digest(load_tokenizer(str(tmp_path / "a"))) == tokenizer_digest(a)
    assert a.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert (a.pad_token_id, a.unk_token_id, a.cls_token_id, a.sep_token_id, a.mask_token_id) == (0, 1, 2, 3, 4)
    assert 5 < len(a) <= 600
    enc = a("Kalo was born in Eastvale .", "He left .", return_token_type_ids=True)
    assert enc["input_ids"][0] == 2 and enc["input_ids"].count(3) == 2 and enc["input_ids"][-1] == 3
    assert a.decode(a("Kalo was born in Eastvale .")["input_ids"], skip_special_tokens=True) == "kalo was born in eastvale ."


# ---------------------------------------------------------------- instances


def _documents(dm: WikiText103DataModule, split: str) -> list[list[str]]:
    text = (dm.data_dir / RAW_FILES[split]).read_text().split("\n")
    return [split_sentences_regex(line) for line in text if line.strip()]


def test_instances_are_sop_pairs_of_whole_sentences(prepared) -> None:
    dm, tok = prepared, prepared.tokenizer
    documents = _documents(dm, "train")
    normalize = lambda s: tok.decode(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    runs = {}
    for sentences in documents:
        norm = [normalize(s) for s in sentences]
        for i in range(len(norm)):
            for j in range(i + 2, len(norm) + 1):
                runs[" ".join(norm[i:j])] = j - i
    train = dm.datasets["train"]
    assert len(train) > 300
    checked = swapped = 0
    for ex in train:
        ids, types, special = ex["input_ids"], ex["token_type_ids"], ex["special_tokens_mask"]
        assert len(ids) <= MAX_LEN and len(ids) == len(types) == len(special)
        seps = [i for i, t in enumerate(ids) if t == tok.sep_token_id]
        assert ids[0] == tok.cls_token_id and len(seps) == 2 and seps[1] == len(ids) - 1
        assert special == [1 if i in (0, *seps) else 0 for i in range(len(ids))]
        assert types == [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0] - 1)
        assert ex["sentence_order_label"] in (0, 1)
        swapped += ex["sentence_order_label"]
        if len(ids) < MAX_LEN:  # not truncated: A and B are whole sentences of one document, swapped iff label 1
            a, b = tok.decode(ids[1 : seps[0]]), tok.decode(ids[seps[0] + 1 : seps[1]])
            original = f"{b} {a}" if ex["sentence_order_label"] else f"{a} {b}"
            assert original in runs, original
            checked += 1
    assert checked > len(train) // 3
    assert abs(swapped / len(train) - 0.5) < 4.5 * math.sqrt(0.25 / len(train))


def test_instance_cache_reloads_identically_and_does_not_depend_on_workers(tmp_path, prepared) -> None:
    again = make_dm(prepared.data_dir, synthetic_articles=120)
    again.prepare_data()  # finds the cache
    again.setup("fit")
    assert again.instances_dir(again.tokenizer) == prepared.instances_dir(prepared.tokenizer)
    for split in ("train", "validation", "test"):
        assert again.datasets[split][:] == prepared.datasets[split][:]
    # Rebuilt from the same text elsewhere, with two preprocessing processes: the same instances.
    shutil.copytree(prepared.data_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("cache"))
    rebuilt = make_dm(tmp_path / "copy", synthetic_articles=120, preprocessing_workers=2)
    rebuilt.prepare_data()
    rebuilt.setup("fit")
    assert tokenizer_digest(rebuilt.tokenizer) == tokenizer_digest(prepared.tokenizer)
    assert rebuilt.datasets["train"][:] == prepared.datasets["train"][:]


def test_local_raw_files_are_read_and_keyed_by_content(tmp_path, prepared) -> None:
    local = tmp_path / "local"
    local.mkdir()
    for name in RAW_FILES.values():
        shutil.copy(prepared.data_dir / name, local / name)
    dm = WikiText103DataModule(str(local), train_tokenizer=True, tokenizer_vocab_size=600, max_seq_length=MAX_LEN, download=False)
    assert not dm.is_synthetic and dm.local_files()
    dm.prepare_data()
    dm.setup("fit")
    assert dm.datasets["train"][:] == prepared.datasets["train"][:]
    with open(local / RAW_FILES["train"], "a") as f:
        f.write(" A new line . With two sentences . \n")
    changed = WikiText103DataModule(str(local), train_tokenizer=True, tokenizer_vocab_size=600, max_seq_length=MAX_LEN, download=False)
    assert changed.source_key() != dm.source_key()


# ---------------------------------------------------------------- masking


def test_mlm_masking_is_15_percent_with_80_10_10(prepared) -> None:
    dm, tok = prepared, prepared.tokenizer
    features = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    torch.manual_seed(0)
    batch = dm.collator()([dict(f) for f in features])
    original = tok.pad([{"input_ids": f["input_ids"]} for f in features], return_tensors="pt")["input_ids"]
    special = tok.pad([{"input_ids": f["special_tokens_mask"]} for f in features], return_tensors="pt")["input_ids"].bool()
    real = batch["attention_mask"].bool()
    maskable = real & ~special
    masked = batch["labels"] != -100
    assert not (masked & ~maskable).any()  # never a special token or padding
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][~masked], original[~masked])
    n, m = int(maskable.sum()), int(masked.sum())
    assert abs(m / n - 0.15) < 4.5 * math.sqrt(0.15 * 0.85 / n), (m, n)
    as_mask = int((batch["input_ids"][masked] == tok.mask_token_id).sum())
    unchanged = int((batch["input_ids"][masked] == original[masked]).sum())
    assert abs(as_mask / m - 0.8) < 4.5 * math.sqrt(0.16 / m)
    assert abs(unchanged / m - 0.1) < 4.5 * math.sqrt(0.09 / m) + 2 / len(tok)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["attention_mask"].shape
    assert torch.equal(batch["sentence_order_label"], torch.tensor([f["sentence_order_label"] for f in features]))


def test_masking_is_reproducible_from_seed_step_and_peer(prepared) -> None:
    """What a validator relies on: the masked batch of (run seed, step, peer) is rebuilt from the dataset alone."""
    dm = prepared
    dataset = VerifiableDataset(dm.datasets["train"], run_seed=7)
    collate = VerifiableCollate(dm.collator(), run_seed=7)
    first = rebuild_batch(dataset, 8, step=5, peer=2, collate_fn=collate)
    torch.manual_seed(123)  # whatever the global RNG holds
    again = rebuild_batch(dataset, 8, step=5, peer=2, collate_fn=dm.collator())
    for k in first:
        assert torch.equal(first[k], again[k]), k
    other_peer = rebuild_batch(dataset, 8, step=5, peer=3, collate_fn=collate)
    other_step = rebuild_batch(dataset, 8, step=6, peer=2, collate_fn=collate)
    assert not torch.equal(first["labels"], other_peer["labels"]) and not torch.equal(first["labels"], other_step["labels"])
    # The same samples collated under another step's key get other masks: the key seeds the masking.
    keys = batch_keys(len(dataset), 8, 7, step=5, peer=2)
    assert torch.equal(collate([dataset[k] for k in keys])["labels"], first["labels"])
    remasked = collate([dataset[k._replace(step=99)] for k in keys])
    assert torch.equal(remasked["sentence_order_label"], first["sentence_order_label"])
    assert not torch.equal(remasked["labels"], first["labels"])


def test_dataloaders_and_vocab_size(prepared) -> None:
    dm = prepared
    train = dm.train_dataloader()
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "sentence_order_label"}
    assert batch["input_ids"].shape[0] == dm.batch_size and batch["input_ids"].shape[1] <= MAX_LEN
    assert len(train) == len(dm.datasets["train"]) // dm.batch_size
    small = make_dm(dm.data_dir, synthetic_articles=120, val_subset=10, eval_batch_size=4)
    small.setup("validate")
    assert sum(b["input_ids"].shape[0] for b in small.val_dataloader()) == 10
    assert dm.vocab_size == len(dm.tokenizer)
    with pytest.raises(RuntimeError, match="setup"):
        _ = WikiText103DataModule(str(dm.data_dir)).vocab_size
