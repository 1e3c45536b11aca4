from diffattr.demo import run_demo


def test_demo_runs_offline_and_attributes_the_canary_replica(tmp_path, capsys, link_toy_run):
    link_toy_run(tmp_path / "run")  # the demo's run: baseline and calibration computed once per session
    results = run_demo(tmp_path, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert len(results) == 3 and f"results in {tmp_path / 'run' / 'queries'}" in out
    assert all((tmp_path / "run" / "queries" / r.query_id / "result.json").is_file() for r in results)
    # the first demo seed replicates canary 2 (see assets/toy/demo.json)
    assert results[0].top_ids[0].startswith("canaries/canary2_")
