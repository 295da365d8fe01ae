"""CLIP embedding datasets: writer/reader round trips (ours and clip-retrieval), atomic writes, iterator."""
import collections
import itertools
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle2_jax.data import embeddings, pipeline

N, D, L, W = 25, 8, 5, 4


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    mask = np.arange(L)[None, :] < rng.integers(1, L + 1, size=(N, 1))
    return {
        "image_embeds": rng.normal(size=(N, D)).astype(np.float32),
        "text_embeds": rng.normal(size=(N, D)).astype(np.float32),
        "text_encodings": rng.normal(size=(N, L, W)).astype(np.float16),
        "text_mask": mask,
        "captions": [f"caption {i} \u00e9" for i in range(N)],
    }


@pytest.fixture(scope="module")
def ours(tmp_path_factory, arrays):
    out_dir = tmp_path_factory.mktemp("emb") / "ours"
    embeddings.write_embedding_dataset(str(out_dir), **arrays, shard_size=10)
    return str(out_dir)


def test_writer_layout_and_round_trip(ours, arrays):
    for folder, prefix, suffix in (("img_emb", "img_emb", "npy"), ("text_emb", "text_emb", "npy"),
                                   ("text_enc", "text_enc", "npy"), ("text_mask", "text_mask", "npy"),
                                   ("metadata", "metadata", "parquet")):
        assert sorted(os.listdir(os.path.join(ours, folder))) == [f"{prefix}_{i:04d}.{suffix}" for i in range(3)]
    assert np.load(os.path.join(ours, "img_emb", "img_emb_0002.npy")).shape == (5, D)
    source = embeddings.EmbeddingSource(ours)
    assert len(source) == N
    for i in range(N):
        item = source[i]
        np.testing.assert_array_equal(item["image_embed"], arrays["image_embeds"][i])
        np.testing.assert_array_equal(item["text_embed"], arrays["text_embeds"][i])
        np.testing.assert_array_equal(item["text_encodings"], arrays["text_encodings"][i])
        assert item["text_encodings"].dtype == np.float16  # stored as given
        np.testing.assert_array_equal(item["text_mask"], arrays["text_mask"][i])
        assert item["caption"] == arrays["captions"][i]
    np.testing.assert_array_equal(source[-1]["image_embed"], arrays["image_embeds"][-1])
    with pytest.raises(IndexError):
        source[N]
    clone = pickle.loads(pickle.dumps(source))  # what grain worker processes receive
    np.testing.assert_array_equal(clone[13]["text_embed"], arrays["text_embeds"][13])


def test_reads_a_plain_clip_retrieval_directory(tmp_path, arrays):
    root = tmp_path / "clip_retrieval"
    for folder in ("img_emb", "text_emb", "metadata"):
        (root / folder).mkdir(parents=True)
    # clip-retrieval: float16, unpadded shard numbers (so 10 sorts after 2), extra metadata columns.
    bounds = [0, 3, 6, 9, 12, 15, 18, 20, 21, 22, 23, 24, N]
    for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(root / "img_emb" / f"img_emb_{shard}.npy", arrays["image_embeds"][start:stop].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{shard}.npy", arrays["text_embeds"][start:stop].astype(np.float16))
        pq.write_table(pa.table({"url": [f"http://x/{i}" for i in range(start, stop)],
                                 "caption": arrays["captions"][start:stop]}),
                       root / "metadata" / f"metadata_{shard}.parquet")
    source = embeddings.EmbeddingSource(str(root))
    assert len(source) == N
    assert sorted(source[0]) == ["caption", "image_embed", "text_embed"]
    for i in range(N):
        np.testing.assert_array_equal(source[i]["image_embed"], arrays["image_embeds"][i].astype(np.float16))
        assert source[i]["caption"] == arrays["captions"][i]
    batch = next(pipeline.make_embedding_iterator(source, batch_size=5, seed=0))
    assert batch["image_embed"].dtype == np.float32 and batch["image_embed"].shape == (5, D)
    assert sorted(embeddings.EmbeddingSource(str(root), captions=False)[0]) == ["image_embed", "text_embed"]


def test_writes_are_atomic(tmp_path, arrays):
    out_dir = tmp_path / "atomic"
    with pytest.raises(RuntimeError, match="boom"):
        with embeddings.EmbeddingWriter(str(out_dir), shard_size=4) as writer:
            writer.add(arrays["image_embeds"][:10], arrays["text_embeds"][:10])  # two shards on disk
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # neither out_dir nor a temporary directory is left
    with embeddings.EmbeddingWriter(str(out_dir), shard_size=4) as writer:
        for start in range(0, N, 7):  # uneven batches spanning shard boundaries
            writer.add(arrays["image_embeds"][start:start + 7], arrays["text_embeds"][start:start + 7])
    source = embeddings.EmbeddingSource(str(out_dir))
    assert source.shard_sizes == [4, 4, 4, 4, 4, 4, 1]
    np.testing.assert_array_equal(np.stack([source[i]["text_embed"] for i in range(N)]), arrays["text_embeds"])
    with pytest.raises(ValueError, match="out_dir"):
        embeddings.write_embedding_dataset(str(out_dir), arrays["image_embeds"], arrays["text_embeds"])
    embeddings.write_embedding_dataset(str(out_dir), arrays["image_embeds"][:3], arrays["text_embeds"][:3],
                                       overwrite=True)
    assert len(embeddings.EmbeddingSource(str(out_dir))) == 3
    assert sorted(os.listdir(tmp_path)) == ["atomic"]


def test_bad_inputs_raise(tmp_path, arrays):
    image, text = arrays["image_embeds"], arrays["text_embeds"]
    with pytest.raises(ValueError, match="text_embeds"):
        embeddings.write_embedding_dataset(str(tmp_path / "a"), image, text[:-1])
    with pytest.raises(ValueError, match="text_mask"):
        embeddings.write_embedding_dataset(str(tmp_path / "b"), image, text, arrays["text_encodings"],
                                           arrays["text_mask"][:, :-1])
    with pytest.raises(ValueError, match="captions"):
        embeddings.write_embedding_dataset(str(tmp_path / "c"), image, text, captions="one string")
    with pytest.raises(ValueError, match="shard_size"):
        embeddings.write_embedding_dataset(str(tmp_path / "d"), image, text, shard_size=0)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="directory"):
        embeddings.EmbeddingSource(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="img_emb"):
        embeddings.EmbeddingSource(str(tmp_path))


def test_embedding_iterator_resumes_exactly_and_shards_disjointly(ours, arrays):
    source = embeddings.EmbeddingSource(ours)

    def make(**kwargs):
        return pipeline.make_embedding_iterator(source, batch_size=4, seed=3, **kwargs)

    iterator = make()
    first = next(iterator)
    assert first["image_embed"].dtype == np.float32 and first["text_encodings"].dtype == np.float32
    assert first["text_mask"].dtype == bool and first["caption"].dtype == object
    rows = [int(c.split()[1]) for c in first["caption"]]
    np.testing.assert_array_equal(first["image_embed"], arrays["image_embeds"][rows])
    next(iterator)
    state = iterator.get_state()
    following = [next(iterator) for _ in range(8)]  # past the end of the first epoch
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(following, [next(resumed) for _ in range(8)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    seen = collections.Counter()
    for process_index in range(2):
        batches = make(process_index=process_index, process_count=2, num_epochs=1, drop_remainder=False)
        seen.update(itertools.chain.from_iterable(b["caption"] for b in batches))
    assert sorted(seen) == sorted(arrays["captions"]) and set(seen.values()) == {1}
