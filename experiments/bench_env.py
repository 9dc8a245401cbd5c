"""Benchmark env steps/s under PPO training: the batched table VecEnv against DummyVecEnv over the plain env.

    python experiments/bench_env.py                      # digits shipped backbone
"""

from __future__ import annotations

import argparse
import time

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from backbone.data import default_paths
from backbone.errors import HelpFormatter, positive_int, run_cli
from backbone.io import check_output_path, write_json
from envs import AdaptiveComputeEnv, TableVecEnv
from policy.job import PolicyJob, load_tables


def ppo_steps_per_s(env, timesteps: int, n_steps: int, batch_size: int) -> float:
    ppo = PPO("MlpPolicy", env, n_steps=n_steps, batch_size=batch_size, n_epochs=5, gamma=0.0, device="cpu", seed=0,
              policy_kwargs={"net_arch": [64, 64]})
    start = time.perf_counter()
    ppo.learn(timesteps)
    return timesteps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits', 'fashion-mnist' or a path to an .npz")
    parser.add_argument("--backbone", default=None, help="checkpoint directory (default: checkpoints/<dataset>)")
    parser.add_argument("--num-envs", type=positive_int, default=256, help="inputs stepped at once by the batched env")
    parser.add_argument("--timesteps", type=positive_int, default=100_000, help="env steps timed")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    args = parser.parse_args(argv)
    check_output_path(args.json, "--json")
    torch.set_num_threads(1)

    job = PolicyJob(dataset=args.dataset, backbone=args.backbone or default_paths(args.dataset)["backbone"])
    table = load_tables(job, ("policy_train",))[0]["policy_train"]
    n_steps = max(1, 2048 // args.num_envs)
    batched = ppo_steps_per_s(TableVecEnv(table, args.num_envs, lam=0.1), args.timesteps, n_steps, 512)
    dummy_env = DummyVecEnv([lambda: AdaptiveComputeEnv(table=table, lam=0.1)] * args.num_envs)
    dummy = ppo_steps_per_s(dummy_env, args.timesteps, n_steps, 512)
    result = {"num_envs": args.num_envs, "timesteps": args.timesteps, "table_vec_env_steps_per_s": batched,
              "dummy_vec_env_steps_per_s": dummy, "speedup": batched / dummy}
    print(f"PPO env steps/s with {args.num_envs} envs: batched table VecEnv {batched:,.0f}, "
          f"DummyVecEnv {dummy:,.0f} ({batched / dummy:.2f}x)")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    run_cli(main)
