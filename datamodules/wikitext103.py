"""WikiText-103 for ALBERT pre-training (masked LM + sentence-order prediction) as a LightningDataModule.

Text comes from local raw files (``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``, or the
``.tokens`` files of the non-raw release) in ``data_dir`` when they are there, else from the Hugging Face
hub through ``datasets`` (``Salesforce/wikitext``, ``wikitext-103-raw-v1``), or from the synthetic
stand-in (``synthetic=True``). ``prepare_data`` builds the sentence-order instances once and caches
them on disk (Arrow, via ``datasets.save_to_disk``) under a key of everything that decides them;
tokens are masked for MLM at batch time by transformers' ``DataCollatorForLanguageModeling`` (15%,
80/10/10) from torch's RNG. The module knows nothing of BTARD: under ``BTARDStrategy(verify=True)``
the strategy seeds that RNG per (step, peer, micro-batch), so a validator rebuilds the same masks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from datamodules.albert_tokenizer import ALBERT_HUB_TOKENIZER, load_tokenizer, tokenizer_digest, train_tokenizer
from datamodules.sentence_order import SPLITTERS, InstanceBuilder
from datamodules.synthetic_text import SYNTHETIC_MARKER, write_synthetic_wikitext
from lightning_btard.extras import require
from lightning_btard.lightning_package import pl, rank_zero_info, rank_zero_warn

__all__ = ["WikiText103DataModule"]

_SPLITS = {"train": "train", "validation": "valid", "test": "test"}
_CACHE_VERSION = 1  # bump when the instances built from the same inputs change


class WikiText103DataModule(pl.LightningDataModule):
    """WikiText-103 as ALBERT sentence-order instances, masked for MLM at batch time.

    Args:
        data_dir: where local raw files are looked for and where the caches (instances, trained tokenizer) go.
        download: ``None`` reads local files when present and otherwise downloads from the hub; ``False`` never
            downloads; ``True`` uses the hub even when local files exist.
        synthetic: write (once) and use the synthetic stand-in corpus in ``data_dir`` (NOT WikiText-103).
        synthetic_articles: number of synthetic training articles.
        hub_dataset, hub_config: the hub dataset used when downloading.
        tokenizer: a hub name or a local directory of an ALBERT tokenizer (default albert-large-v2's).
        train_tokenizer: instead, train a SentencePiece-style Unigram tokenizer of ``tokenizer_vocab_size`` on the
            training text (offline machines; cached in ``data_dir``).
        max_seq_length: tokens per instance, special tokens included (512 in the paper).
        mlm_probability: fraction of (non-special) tokens masked for MLM; masked ones become ``[MASK]`` 80%, a
            random token 10%, unchanged 10%.
        sentence_splitter: ``"regex"`` (offline) or ``"punkt"`` (nltk's, as the released code; needs its data).
        batch_size: sequences per micro-batch per peer (4 in the paper).
        eval_batch_size: sequences per validation/test batch.
        num_workers: DataLoader workers.
        preprocessing_workers: processes that build the instances (``datasets.map(num_proc=...)``).
        seed: seed of the segment cuts and swaps (every peer must use the same one).
        val_subset: keep only the first N validation instances (quick periodic evaluation).
        pad_to_multiple_of: pad batches to a multiple of this many tokens (8 helps fp16 tensor cores).
    """

    def __init__(
        self,
        data_dir: str = "data/wikitext-103",
        download: Optional[bool] = None,
        synthetic: bool = False,
        synthetic_articles: int = 400,
        hub_dataset: str = "Salesforce/wikitext",
        hub_config: str = "wikitext-103-raw-v1",
        tokenizer: str = ALBERT_HUB_TOKENIZER,
        train_tokenizer: bool = False,
        tokenizer_vocab_size: int = 30000,
        max_seq_length: int = 512,
        mlm_probability: float = 0.15,
        sentence_splitter: str = "regex",
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        preprocessing_workers: int = 1,
        seed: int = 0,
        val_subset: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
    ) -> None:
        super().__init__()
        for module in ("datasets", "transformers"):  # the [albert] extra: say so now, not at prepare_data
            require(module, "datamodules.WikiText103DataModule")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if val_subset is not None and val_subset < 1:
            raise ValueError(f"val_subset must be a positive number of instances or None, got {val_subset}")
        if synthetic and download:
            raise ValueError("synthetic=True writes a local stand-in corpus; it cannot be combined with download=True")
        if sentence_splitter not in SPLITTERS:
            raise ValueError(f"unknown sentence_splitter {sentence_splitter!r}; choose one of {sorted(SPLITTERS)}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.datasets: Any = None
        self._source: Optional[str] = None
        self._warned_synthetic = False

    # ------------------------------------------------------------------ where the text comes from

    @property
    def is_synthetic(self) -> bool:
        """True when ``data_dir`` holds the synthetic stand-in (its ``SYNTHETIC`` marker), not WikiText-103."""
        return (self.data_dir / SYNTHETIC_MARKER).is_file()

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def local_files(self) -> dict[str, Path]:
        """The local raw files by split (``.raw`` preferred over ``.tokens``); empty unless all three are present."""
        found = {}
        for split, stem in _SPLITS.items():
            for suffix in ("raw", "tokens"):
                path = self.data_dir / f"wiki.{stem}.{suffix}"
                if path.is_file():
                    found[split] = path
                    break
        return found if len(found) == len(_SPLITS) else {}

    def _use_hub(self) -> bool:
        if self.hparams.download is True:
            return True
        if self.local_files():
            return False
        if self.hparams.download is False:
            raise FileNotFoundError(
                f"WikiText-103 not found: no wiki.train.raw, wiki.valid.raw and wiki.test.raw in {self.data_dir.resolve()}, and "
                "download=False. To fix: put the extracted wikitext-103-raw files there, or run once with internet access "
                f"and download=None/True (the hub's {self.hparams.hub_dataset}/{self.hparams.hub_config}), or for offline "
                "demos and tests set synthetic=true to write a stand-in corpus (it is NOT WikiText-103)."
            )
        return True

    def source_key(self) -> str:
        """What identifies the text: the hub dataset, or the local files' contents."""
        if self._source is None:
            if self._use_hub():
                self._source = f"hub:{self.hparams.hub_dataset}/{self.hparams.hub_config}"
            else:
                digest = hashlib.sha256()
                for split, path in sorted(self.local_files().items()):
                    digest.update(split.encode())
                    with open(path, "rb") as f:
                        for block in iter(lambda: f.read(1 << 22), b""):
                            digest.update(block)
                self._source = "local:" + digest.hexdigest()[:16]
        return self._source

    def raw_datasets(self) -> Any:
        """The raw text as a ``datasets.DatasetDict`` with a ``text`` column (one WikiText line per row)."""
        import datasets

        if not self._use_hub():
            files = {split: str(path) for split, path in self.local_files().items()}
            return datasets.load_dataset("text", data_files=files, cache_dir=str(self.cache_dir / "hf"))
        try:
            return datasets.load_dataset(self.hparams.hub_dataset, self.hparams.hub_config)
        except Exception as e:  # noqa: BLE001 - offline, hub errors and missing configs get one message
            raise FileNotFoundError(
                f"could not load {self.hparams.hub_dataset}/{self.hparams.hub_config} from the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, put wiki.train.raw, "
                f"wiki.valid.raw and wiki.test.raw in {self.data_dir.resolve()}, or set synthetic=true for a stand-in."
            ) from None

    # ------------------------------------------------------------------ tokenizer and instances

    def _trained_tokenizer_dir(self) -> Path:
        return self.cache_dir / f"tokenizer-unigram{self.hparams.tokenizer_vocab_size}-{self.source_key().split(':')[-1][:16].replace('/', '_')}"

    def _load_tokenizer(self, raw: Any = None) -> Any:
        if not self.hparams.train_tokenizer:
            return load_tokenizer(self.hparams.tokenizer)
        path = self._trained_tokenizer_dir()
        if (path / "tokenizer.json").is_file():
            return load_tokenizer(str(path))
        if raw is None:
            raise RuntimeError(f"the trained tokenizer {path} is missing: prepare_data() must run before setup()")
        rank_zero_info(f"Training a Unigram tokenizer (vocab {self.hparams.tokenizer_vocab_size}) on the training text into {path}")
        return train_tokenizer(raw["train"]["text"], self.hparams.tokenizer_vocab_size, path)

    def instances_dir(self, tokenizer: Any) -> Path:
        """The on-disk cache of the instances built from this text with ``tokenizer`` and these settings."""
        hp = self.hparams
        key = json.dumps(
            [_CACHE_VERSION, self.source_key(), tokenizer_digest(tokenizer), hp.max_seq_length, hp.sentence_splitter, hp.seed]
        )
        return self.cache_dir / f"sop-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def build_instances(self, raw: Any, tokenizer: Any) -> Any:
        """Sentence-order instances of every split (a ``datasets.DatasetDict``)."""
        import datasets

        hp = self.hparams
        built = {}
        for split in _SPLITS:
            builder = InstanceBuilder(tokenizer, hp.max_seq_length, hp.sentence_splitter, hp.seed, split)
            built[split] = raw[split].map(
                builder,
                batched=True,
                with_indices=True,
                remove_columns=raw[split].column_names,
                num_proc=hp.preprocessing_workers if hp.preprocessing_workers > 1 else None,
                desc=f"SOP instances ({split})",
                load_from_cache_file=False,
            )
        return datasets.DatasetDict(built)

    def prepare_data(self) -> None:
        """Write the synthetic corpus or download the text, get the tokenizer and cache the instances (once per node)."""
        if self.hparams.synthetic:
            write_synthetic_wikitext(self.data_dir, n_train=self.hparams.synthetic_articles, n_valid=40, n_test=40)
        self.source_key()  # missing text is reported before anything else
        raw = None
        if self.hparams.train_tokenizer and not (self._trained_tokenizer_dir() / "tokenizer.json").is_file():
            raw = self.raw_datasets()
        tokenizer = self._load_tokenizer(raw)
        target = self.instances_dir(tokenizer)
        if (target / "dataset_dict.json").is_file():
            return
        raw = raw if raw is not None else self.raw_datasets()
        tmp = target.with_name(target.name + ".tmp")
        self.build_instances(raw, tokenizer).save_to_disk(str(tmp))
        tmp.rename(target)
        rank_zero_info(f"Cached the sentence-order instances in {target}")

    def setup(self, stage: Optional[str] = None) -> None:
        import datasets

        if self.hparams.synthetic and not self.is_synthetic:
            raise RuntimeError(f"synthetic=True but {self.data_dir} has no synthetic corpus: prepare_data() must run first")
        if self.is_synthetic and not self._warned_synthetic:
            self._warned_synthetic = True
            rank_zero_warn(
                f"TRAINING ON SYNTHETIC STAND-IN TEXT, NOT WIKITEXT-103: {self.data_dir} was written by "
                "write_synthetic_wikitext (SYNTHETIC marker found). Losses measured on it say nothing about WikiText-103."
            )
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        if self.datasets is None:
            path = self.instances_dir(self.tokenizer)
            if not (path / "dataset_dict.json").is_file():
                raise RuntimeError(f"the instance cache {path} is missing: prepare_data() must run before setup()")
            self.datasets = datasets.load_from_disk(str(path))

    # ------------------------------------------------------------------ batches

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce (available after ``setup``)."""
        if self.tokenizer is None:
            raise RuntimeError("WikiText103DataModule.setup() must run before vocab_size is read")
        return len(self.tokenizer)

    def collator(self, seed: Optional[int] = None) -> Any:
        """Pads a list of instances and masks them for MLM: ``input_ids``, ``token_type_ids``, ``attention_mask``,
        ``labels`` (-100 where not masked) and ``sentence_order_label``. ``seed=None`` draws from torch's RNG."""
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(
            self.tokenizer,
            mlm_probability=self.hparams.mlm_probability,
            pad_to_multiple_of=self.hparams.pad_to_multiple_of,
            seed=seed,
        )

    def _split(self, name: str) -> Any:
        if self.datasets is None:
            raise RuntimeError(f"WikiText103DataModule.setup() must run before the {name} dataloader is requested")
        return self.datasets[name]

    def train_dataloader(self) -> DataLoader:
        """Shuffled instances, masked at batch time; the last incomplete batch is dropped."""
        return DataLoader(
            self._split("train"),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        """The validation split (its first ``val_subset`` instances when set), masked with a fixed seed."""
        dataset = self._split("validation")
        if self.hparams.val_subset is not None and self.hparams.val_subset < len(dataset):
            dataset = dataset.select(range(self.hparams.val_subset))
        return self._eval_loader(dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._split("test"))

    def _eval_loader(self, dataset: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator(seed=self.hparams.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
