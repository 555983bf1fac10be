"""The atproto layer: how meshletd sees the commune and speaks in it.

Modules (each one job; the pure ones do no I/O):

- `lexicon` (pure): `Lexicons.load()`, `validate_record(nsid, value, rkey=)`; the files in
  `lexicons/` are the truth. `MAX_RECORD_BYTES`.
- `records` (pure): the one conversion between the record vocabulary
  (`meshletd.core.records`) and JSON, under the lexicons: `record_from_json`,
  `record_to_json`, `fill_workload` (the defaults of `meshletctl run`, once).
- `identity`: `IdentityResolver(plc_url).resolve(did, fresh=)` -> `Identity(pds,
  signing_key, handle, meshlet_endpoint)`, cached; did:plc via the SDK, did:web (incl.
  `localhost%3APORT` over http) by our own resolver. `StaticIdentityResolver` fake.
- `verify` (pure): commit signature, block CIDs, MST proofs.
- `reader`: unauthenticated repo reads; `prove_record` = verified `sync.getRecord`.
- `pds`: `PdsClient` (session, get/list/put/delete, `apply_writes` <= 200 ops, idempotent
  puts), `WriteLedger` (points), `WriteQueue` (ordered, retried, optional journal).
- `frames` (pure): `decode_frame`, `FrameDecoder`, `FrameOutcome`, `RepoMirror`,
  `RecordEvent`, `Interest`.
- `firehose`: `PdsSubscription`, `Firehose` (`watch`/`unwatch`/`resync`, sink of
  `RecordEvent`s), `CursorStore` protocol with `MemoryCursorStore` / `FileCursorStore`;
  re-exports the names of `frames`.
- `cluster`: `ConfiguredClusters` (pure, over the core's `ClusterView`), `ClusterFormation`
  (trio), `publish_own_records`.
- `testing`: `FakeRepo` (signed real-format frames), `SigningKey`, `MeshletNode` harness.
"""
