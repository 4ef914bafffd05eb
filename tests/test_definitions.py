"""The code location loads, and holds the graph, checks, jobs, sensors and schedule we expect."""

import dagster as dg

from pipelines.definitions import defs


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_asset_graph_shape():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"midi_corpus", "filtered_midi", "chord_annotations", "hid_tokens",
                    "vocabulary", "arrow_dataset"}  # fmt: skip
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
        for k in graph.get_all_asset_keys()
    }
    assert parents["filtered_midi"] == {"midi_corpus"}
    assert parents["chord_annotations"] == {"filtered_midi"}
    assert parents["hid_tokens"] == {"chord_annotations"}
    assert parents["vocabulary"] == {"hid_tokens"}
    assert parents["arrow_dataset"] == {"hid_tokens", "vocabulary"}
    for key in keys - {"midi_corpus"}:
        assert graph.get(dg.AssetKey(key)).code_version, key
    checks = {c.name for c in graph.asset_check_keys}
    assert checks == {"vocabulary_covers_dataset", "splits_do_not_overlap",
                      "sequences_not_empty", "buckets_sum_to_totals"}  # fmt: skip


def test_jobs_sensors_schedule():
    assert {j.name for j in defs.jobs} == {"shard_job", "dataset_job"}
    assert {s.name for s in defs.sensors} == {"midi_corpus_sensor", "dataset_after_shards_sensor"}
    schedule = defs.resolve_schedule_def("corpus_refresh_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
