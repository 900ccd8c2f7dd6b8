"""The demo on a flow-matching model, switched by `sd_model` alone: every stage end to end on the toy-flow
folder the pre-training script's smoke run makes (a 1-block SD 3 transformer after 3 updates), at sizes
below the quick demo's: CI's quick flow demo, 20 s on this 2-core CPU beside two other jobs since the sampler
runs a T5-less SD 3 on one zero T5 token (84 s before)."""

import json

from toyworld.cli import demo_main

# QUICK (--quick) made smaller still: fewer prompts, users, updates and samples; no learning curve or ceiling.
SMALLER = {"community.n_prompts": 8, "community.n_users": 6, "community.n_oracle_pair_prompts": 3,
           "community.oracle_images_per_prompt": 3, "critic_curve": [], "critic_ceiling": False,
           "critic.train.epochs": 1, "refl.train.max_updates": 2, "refl.train.batch_size": 2,
           "refl.train.validate_every": 2, "refl.train.checkpoint_every": 2,
           "refl.train.validation_images_per_prompt": 1, "num_inference_steps": 4,
           "refl.step.num_inference_steps": 4, "refl.step.cut_range": [2, 3], "n_compare_prompts": 2,
           "compare.n_samples": 4, "compare.batch_size": 4, "n_validation_prompts": 2}


def test_flow_demo_runs_every_stage_with_the_flow_sampler(toy_flow_dir, tmp_path):
    out = tmp_path / "demo-flow"
    overrides = [a for k, v in SMALLER.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert demo_main(["--out", str(out), "--quick", "--set", f"sd_model={toy_flow_dir}", *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    demo = results["demo"]
    # The comparison and ReFL sampled with the flow model's own sampler; the demo's config kept its DDIM
    # default, which a flow model has no use for.
    assert results["config"]["scheduler"] == "flow_euler"
    refl_saved = (out / "refl" / "config.yaml").read_text()
    assert "scheduler: flow_euler" in refl_saved
    assert "scheduler: ddim" in (out / "demo_config.yaml").read_text()
    # Every stage ran and means what it means on the UNet: pairs from the community's feed, a critic measured
    # against the oracle, a ReFL LoRA on the transformer, base vs ReFL judged by the oracle.
    assert demo["community"]["community"]["n_pairs"] > 0
    assert 0.0 <= demo["critic"]["accuracy_vs_oracle"]["pairwise_accuracy"] <= 1.0
    lora = out / demo["refl"]["lora"]
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    assert {"base_random", "refl_random"} <= set(results["arms"])
    assert demo["base_model"]["transformer_updates"] == 3  # the flow model's own pre-training report
    assert (out / "report.html").is_file()
