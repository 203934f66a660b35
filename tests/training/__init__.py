"""Tests of modse_megatron.training. Helpers here build small real corpora in temp dirs."""
import json
import random

_WORDS = ("expert router token layer width pair rank gate loss batch shard tensor the a of to and "
          "größe ñandú 专家 🙂 def return self import class if else for in").split()


def random_texts(n: int, seed: int, max_words: int = 120) -> list[str]:
    """``n`` documents of random words (some non-ASCII), deterministic in ``seed``."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, max_words))) + "\n"
            for _ in range(n)]


def write_jsonl(path, texts, key: str = "text") -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({key: text, "id": i}, ensure_ascii=False) + "\n")


def make_dataset(tmp_path, name: str = "corpus", n_docs: int = 300, vocab_size: int = 400, seed: int = 0):
    """Preprocess ``n_docs`` random documents (with EOD) -> (prefix, tokenizer.json, texts)."""
    from modse_megatron.training.preprocess import preprocess

    texts = random_texts(n_docs, seed)
    src = tmp_path / f"{name}.jsonl"
    write_jsonl(src, texts)
    prefix = str(tmp_path / name)
    preprocess([str(src)], prefix, train_tokenizer=True, vocab_size=vocab_size, append_eod=True,
               progress=False)
    return prefix, prefix + ".tokenizer.json", texts


def run_concurrently(target, args, n: int = 2, timeout: float = 120.0) -> list:
    """Start ``n`` forked processes running ``target(*args, queue)`` at once; their results.

    Each ``target`` puts one result on the queue; a process that fails makes the test fail.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * n
    return results
