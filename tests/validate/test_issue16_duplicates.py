"""Issue 16: duplicate search by key lookups (a sha256 claim and pHash band buckets), with bounded reads."""

from __future__ import annotations

import random
import threading
import traceback
from dataclasses import replace
from typing import Any

import pytest

from lesion_imaging import hash_index
from lesion_imaging.bands import BANDS, band_keys, guaranteed_radius, probe_keys
from lesion_imaging.hash_index import BATCH_KEYS, BUCKET_SORT_KEY

from .helpers import Cloud, sample_image_paths

READS = {"GetItem", "BatchGetItem", "Query", "Scan", "TransactGetItems"}


def sample(index: int) -> tuple[str, bytes]:
    path = sample_image_paths()[index]
    return path.stem, path.read_bytes()


def flip(phash: str, bits: list[int]) -> str:
    """``phash`` with the given bit positions (0 = most significant) inverted."""
    value = int(phash, 16)
    for bit in bits:
        value ^= 1 << (255 - bit)
    return f"{value:064x}"


def random_hash(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


class CallCounter:
    """Counts the DynamoDB operations a client makes (a botocore event hook, as the benchmark does)."""

    def __init__(self, client: Any) -> None:
        self.calls: list[str] = []
        self.client = client
        client.meta.events.register("before-call.dynamodb", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls.append(model.name)

    @property
    def reads(self) -> int:
        return sum(1 for c in self.calls if c in READS)

    def close(self) -> None:
        self.client.meta.events.unregister("before-call.dynamodb", self._count)


def test_radius_is_what_the_bands_guarantee() -> None:
    assert guaranteed_radius() == 2 * BANDS - 1 == 15
    h = random_hash(random.Random(1))
    assert len(band_keys(h)) == BANDS and len(probe_keys(h)) == BANDS * 33
    assert len(set(probe_keys(h))) == BANDS * 33


def test_every_hash_within_the_radius_is_found_and_the_radius_is_tight(cloud: Cloud) -> None:
    settings = cloud.app.SETTINGS
    rng = random.Random(16)
    stored = random_hash(rng)
    hash_index.update_band_index(cloud.ddb, settings, "ORIGINAL", stored, None)
    for k in range(20):
        hash_index.update_band_index(cloud.ddb, settings, f"NOISE_{k}", random_hash(rng), None)
    width = 256 // BANDS
    for _trial in range(30):
        # The worst case for the index: the flips spread so that every band differs (2 bits in 7 bands, 1 in one).
        bands = list(range(BANDS))
        rng.shuffle(bands)
        bits = [b * width + o for b in bands[:-1] for o in rng.sample(range(width), 2)]
        bits.append(bands[-1] * width + rng.randrange(width))
        assert len(bits) == guaranteed_radius()
        assert hash_index.find_near_duplicate(cloud.ddb, settings, "NEW", flip(stored, bits)) == ("ORIGINAL", 15)
    # Two bits in every band (16): no band is within a bit, so the index cannot see it (the radius is exact).
    bits = [b * width + o for b in range(BANDS) for o in (3, 17)]
    assert hash_index.find_near_duplicate(cloud.ddb, settings, "NEW", flip(stored, bits)) is None
    # ... unless a band survives: 20 bits, all in three bands, is found (beyond the radius, within max_bits).
    bits = [b * width + o for b in (0, 1) for o in range(8)] + [2 * width + o for o in range(4)]
    assert hash_index.find_near_duplicate(cloud.ddb, settings, "NEW", flip(stored, bits)) == ("ORIGINAL", 20)
    # Beyond max_bits (24) nothing is a duplicate, even when it shares a band.
    bits = [b * width + o for b in (0, 1, 2) for o in range(9)]
    assert hash_index.find_near_duplicate(cloud.ddb, settings, "NEW", flip(stored, bits)) is None


def test_reads_per_upload_do_not_grow_with_the_index(cloud: Cloud) -> None:
    settings = cloud.app.SETTINGS

    def reads_for(index: int) -> tuple[int, int]:
        image_id, data = sample(index)
        counter = CallCounter(cloud.ddb)
        try:
            out = cloud.upload(f"incoming/x/{image_id}.jpg", data)
        finally:
            counter.close()
        assert out["outcome"] == "validated"
        return counter.reads, len(counter.calls)

    small = reads_for(0)
    rng = random.Random(7)
    buckets: dict[str, set[str]] = {}
    for k in range(5000):  # an archive of 5000 more images in the index, written in bulk
        h = random_hash(rng)
        for key in band_keys(h):
            buckets.setdefault(key, set()).add(f"{h}ARCHIVE_{k:05d}")
    requests = [
        {"PutRequest": {"Item": {"pk": {"S": key}, "sk": {"S": BUCKET_SORT_KEY}, "members": {"SS": sorted(m)}}}}
        for key, m in buckets.items()
    ]
    for start in range(0, len(requests), 25):
        cloud.ddb.batch_write_item(RequestItems={settings.hash_table: requests[start : start + 25]})
    large = reads_for(1)
    # 1 manifest GetItem + 3 BatchGetItem (264 bucket keys); no Query or Scan at any size.
    assert small == large
    assert small[0] == 1 + -(-BANDS * 33 // BATCH_KEYS) == 4


def test_copies_at_the_same_instant_end_as_one_validated(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    # DynamoDB applies a conditional write to an item atomically and S3 takes concurrent PUTs of one key; moto
    # does neither safely across threads, so the test serialises those calls (each call, not the uploads), then
    # lets both uploads reach the claim together, 20 times.
    lock = threading.Lock()

    def serialised(call: Any) -> Any:
        def wrapper(**kwargs: Any) -> Any:
            with lock:
                return call(**kwargs)
        return wrapper

    monkeypatch.setattr(cloud.ddb, "update_item", serialised(cloud.ddb.update_item))
    monkeypatch.setattr(cloud.s3, "put_object", serialised(cloud.s3.put_object))
    real_claim = hash_index.claim_picture
    for round_ in range(20):
        image_id, data = sample(100 + round_)
        events = [cloud.put(f"incoming/site_{s}/{image_id}_{s}.jpg", data) for s in "ab"]
        barrier = threading.Barrier(2, timeout=30)

        def claim_together(*args: Any, _barrier: threading.Barrier = barrier, **kwargs: Any) -> Any:
            _barrier.wait()  # both have validated and read "no item": now both write
            return real_claim(*args, **kwargs)

        monkeypatch.setattr(hash_index, "claim_picture", claim_together)
        outcomes: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def run(event: dict[str, Any], _out: list[Any] = outcomes, _err: list[BaseException] = errors) -> None:
            try:
                _out.append(cloud.invoke(event))
            except BaseException as err:  # noqa: BLE001 - reported by the assertion below
                _err.append(err)

        threads = [threading.Thread(target=run, args=(e,)) for e in events]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(outcomes) == 2, f"round {round_}: " + "".join(
            "".join(traceback.format_exception(e)) for e in errors)
        by_outcome = {o["outcome"]: o for o in outcomes}
        assert set(by_outcome) == {"validated", "duplicate"}, f"round {round_}: {outcomes}"
        assert by_outcome["duplicate"]["duplicate_of"] == by_outcome["validated"]["image_id"]
        assert by_outcome["duplicate"]["duplicate_distance"] == 0
        statuses = [cloud.item(f"{image_id}_{s}")["status"] for s in "ab"]  # type: ignore[index]
        assert sorted(statuses) == ["DUPLICATE", "VALIDATED"]


def test_forced_interleaving_the_second_writer_loses(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    image_id, data = sample(130)
    event_a = cloud.put(f"incoming/a/{image_id}_A.jpg", data)
    event_b = cloud.put(f"incoming/b/{image_id}_B.jpg", data)
    real_claim = hash_index.claim_picture
    calls: list[str] = []

    def b_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[3])
        if len(calls) == 1:  # A validated and is about to claim: B runs to the end first
            assert cloud.invoke(event_b)["outcome"] == "validated"
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(hash_index, "claim_picture", b_first)
    out_a = cloud.invoke(event_a)
    assert (out_a["outcome"], out_a["duplicate_of"], out_a["duplicate_distance"]) == ("duplicate", f"{image_id}_B", 0)
    # Redelivered, both keep their outcome (the claim is the upload's own).
    monkeypatch.setattr(hash_index, "claim_picture", real_claim)
    assert cloud.invoke(event_b)["outcome"] == "unchanged"
    assert cloud.invoke(event_a)["status"] == "DUPLICATE"


def test_the_index_holds_validated_images_only_and_follows_a_replaced_upload(cloud: Cloud) -> None:
    settings = cloud.app.SETTINGS
    (first_id, first), (_, second), (_, third) = sample(140), sample(141), sample(142)
    cloud.upload(f"incoming/x/{first_id}.jpg", first)
    copy = cloud.upload("incoming/x/COPY.jpg", first)
    assert copy["outcome"] == "duplicate"

    def members(phash: str) -> set[str]:
        found: set[str] = set()
        for item in hash_index.read_buckets(cloud.ddb, settings.hash_table, band_keys(phash)):
            found |= {m[64:] for m in item.get("members", {}).get("SS", [])}
        return found

    h1 = cloud.item(first_id)["phash"]  # type: ignore[index]
    assert members(h1) == {first_id}, "a DUPLICATE is not indexed"
    out = cloud.upload("incoming/x/OTHER.jpg", second)
    h2 = out["phash"]
    assert "OTHER" in members(h2)
    replaced = cloud.upload("incoming/x/OTHER.jpg", third)  # the same key, another picture
    assert replaced["outcome"] == "validated"
    assert "OTHER" not in members(h2) and "OTHER" in members(replaced["phash"])


def test_a_full_bucket_keeps_its_cap_and_the_image_stays_in_the_other_bands(cloud: Cloud) -> None:
    settings = replace(cloud.app.SETTINGS, bucket_cap=3)
    rng = random.Random(3)
    base = random_hash(rng)
    # Four hashes with the same first slice: the fourth does not fit that bucket.
    hashes = [base[:8] + random_hash(rng)[8:] for _ in range(4)]
    for k, h in enumerate(hashes[:3]):
        assert hash_index.update_band_index(cloud.ddb, settings, f"IMG_{k}", h, None) == []
    # The fourth is left out of the full bucket, which is reported (the handler logs and counts HashBucketFull).
    assert hash_index.update_band_index(cloud.ddb, settings, "IMG_3", hashes[3], None) == [band_keys(hashes[3])[0]]
    hash_index.update_band_index(cloud.ddb, settings, "IMG_2", hashes[2], None)  # a redelivery into a full bucket: fine
    first = hash_index.read_buckets(cloud.ddb, settings.hash_table, [band_keys(hashes[0])[0]])[0]
    assert {m[64:] for m in first["members"]["SS"]} == {"IMG_0", "IMG_1", "IMG_2"}
    # IMG_3 is still found through its other seven bands.
    assert hash_index.find_near_duplicate(cloud.ddb, settings, "NEW", flip(hashes[3], [0, 40])) == ("IMG_3", 2)


def test_a_copy_of_a_copy_is_a_duplicate(cloud: Cloud) -> None:
    (image_id, data) = sample(150)
    cloud.upload(f"incoming/x/{image_id}.jpg", data)
    assert cloud.upload("incoming/y/SECOND.jpg", data)["duplicate_of"] == image_id
    third = cloud.upload("incoming/z/THIRD.jpg", data)
    assert third["outcome"] == "duplicate" and third["duplicate_of"] == image_id
    assert [i["status"] for i in cloud.items().values()].count("VALIDATED") == 1


def test_a_replaced_upload_gives_up_its_bytes(cloud: Cloud) -> None:
    (_, first), (_, second) = sample(160), sample(161)
    cloud.upload("incoming/x/PICTURE.jpg", first)
    assert cloud.upload("incoming/x/PICTURE.jpg", second)["outcome"] == "validated"  # replaced by another picture
    # The first picture is no longer in the data: a new copy of it is the picture again, not a duplicate.
    again = cloud.upload("incoming/y/FIRST_AGAIN.jpg", first)
    assert again["outcome"] == "validated", again
    assert cloud.upload("incoming/z/SECOND_COPY.jpg", second)["duplicate_of"] == "PICTURE"
