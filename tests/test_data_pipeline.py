"""grain image-text pipeline: crops, determinism, resumption, epochs and per-process shards."""
import collections
import itertools

import numpy as np
import pytest
from PIL import Image

from dalle2_jax.data import pipeline

NUM_EXAMPLES = 20


def _position_image(height, width, example_id):
    """Pixel values that say where they are: R = row, G = column, B = example id."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows * 8, cols * 8, np.full_like(rows, example_id)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def source():
    # A plain list is a grain random-access source; captions arrive as bytes, like tfds Text.
    return [{"image": _position_image(16, 20 + (i % 3) * 2, i), "caption": f"example {i}".encode(),
             "id": i, "file": "ignored.png"} for i in range(NUM_EXAMPLES)]


def _to_unit(image):
    return image.astype(np.float32) / 127.5 - 1.0


def _ids(batch):
    return batch["id"].tolist()


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_batch_layout_and_exact_center_crop(source):
    iterator = pipeline.make_image_text_iterator(source, batch_size=4, seed=0, image_size=16)
    batch = next(iterator)
    assert set(batch) == {"image", "caption", "id"}  # the string field "file" is dropped
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (4, 16, 16, 3)
    assert batch["id"].dtype == np.int32
    assert batch["caption"].dtype == object
    for image, caption, example_id in zip(batch["image"], batch["caption"], batch["id"]):
        assert caption == f"example {example_id}"
        original = source[example_id]["image"]
        left = (original.shape[1] - 16) // 2
        np.testing.assert_array_equal(image, _to_unit(original[:, left:left + 16]))


def test_augment_none_resizes_whole_image(source):
    iterator = pipeline.make_image_text_iterator(source, batch_size=2, seed=0, image_size=8, augment="none")
    batch = next(iterator)
    for image, example_id in zip(batch["image"], batch["id"]):
        expected = np.asarray(Image.fromarray(source[example_id]["image"]).resize((8, 8), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(image, _to_unit(expected))


def test_random_crop_takes_exact_windows_and_is_deterministic(source):
    def crops(seed):
        iterator = pipeline.make_image_text_iterator(
            source, batch_size=10, seed=seed, image_size=8, augment="random_crop", crop_scale=(0.5, 0.5),
            num_epochs=1)
        return list(iterator)

    batches = crops(5)
    corners = set()
    for batch in batches:
        for image, example_id in zip(batch["image"], batch["id"]):
            pixels = np.round((image + 1) * 127.5).astype(np.int64)
            top, left = pixels[0, 0, 0] // 8, pixels[0, 0, 1] // 8
            window = source[example_id]["image"][top:top + 8, left:left + 8]
            np.testing.assert_array_equal(pixels, window)  # side 8 = half of 16: no resize
            corners.add((int(top), int(left)))
    assert len(corners) >= 8
    _assert_same_batches(batches, crops(5))
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(batches, crops(6)))


def test_random_flip_mirrors_about_half(source):
    iterator = pipeline.make_image_text_iterator(source, batch_size=NUM_EXAMPLES, seed=1, image_size=16,
                                                 random_flip=True)
    batch = next(iterator)
    flipped = 0
    for image, example_id in zip(batch["image"], batch["id"]):
        original = source[example_id]["image"]
        left = (original.shape[1] - 16) // 2
        crop = _to_unit(original[:, left:left + 16])
        is_flipped = np.array_equal(image, crop[:, ::-1])
        assert is_flipped or np.array_equal(image, crop)
        flipped += is_flipped
    assert 3 <= flipped <= NUM_EXAMPLES - 3


def test_restored_state_reproduces_the_following_batches(source):
    def make():
        return pipeline.make_image_text_iterator(
            source, batch_size=6, seed=7, image_size=8, augment="random_crop", random_flip=True,
            tokenizer=lambda captions: {"input_ids": [[len(c), ord(c[-1])] for c in captions]})

    iterator = make()
    _take(iterator, 3)
    state = iterator.get_state()
    following = _take(iterator, 5)  # crosses two epoch boundaries
    resumed = make()
    resumed.set_state(state)
    _assert_same_batches(following, _take(resumed, 5))
    _assert_same_batches(_take(make(), 8), _take(make(), 8))
    assert following[0]["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(following[0]["input_ids"][:, 0], [len(c) for c in following[0]["caption"]])


def test_every_epoch_is_a_fresh_permutation(source):
    iterator = pipeline.make_image_text_iterator(source, batch_size=3, seed=2, image_size=8, num_epochs=3,
                                                 drop_remainder=False)
    ids = list(itertools.chain.from_iterable(_ids(b) for b in iterator))
    assert len(ids) == 3 * NUM_EXAMPLES
    epochs = [ids[i * NUM_EXAMPLES:(i + 1) * NUM_EXAMPLES] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_EXAMPLES))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(NUM_EXAMPLES))


def test_processes_get_disjoint_shares_that_cover_the_data(source):
    shares = []
    for process_index in range(3):
        iterator = pipeline.make_image_text_iterator(
            source, batch_size=4, seed=0, image_size=8, process_index=process_index, process_count=3,
            num_epochs=1, drop_remainder=False)
        shares.append(list(itertools.chain.from_iterable(_ids(b) for b in iterator)))
    # 20 examples in batches of 4: global batches 0-4, process i takes batches i, i + 3, ...
    assert [len(s) for s in shares] == [8, 8, 4]
    counts = collections.Counter(itertools.chain.from_iterable(shares))
    assert sorted(counts) == list(range(NUM_EXAMPLES)) and set(counts.values()) == {1}


def test_bad_arguments_raise(source):
    make = pipeline.make_image_text_iterator
    with pytest.raises(ValueError, match="augment"):
        make(source, batch_size=2, seed=0, image_size=8, augment="random_resized")
    with pytest.raises(ValueError, match="process_index"):
        make(source, batch_size=2, seed=0, image_size=8, process_index=3, process_count=3)
    with pytest.raises(ValueError, match="batch_size"):
        make(source, batch_size=0, seed=0, image_size=8)
    with pytest.raises(ValueError, match="crop_scale"):
        make(source, batch_size=2, seed=0, image_size=8, crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="source"):
        make(42, batch_size=2, seed=0, image_size=8)
