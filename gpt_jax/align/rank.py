"""Between SFT and the reward model: the labeler ranks responses sampled from the SFT model.

For each ranking prompt, `rank.samples` responses are drawn from the SFT policy; the distinct,
non-empty ones that fit the context are kept, K of them (K uniform in [rank.k_min, rank.k_max], fewer if fewer are
distinct; prompts with under 2 are dropped) are ranked best first by the task's scorer with ties
broken at random, and written as {"prompt", "responses", "scores"} to align.rank_data.
"""

from __future__ import annotations

import jax
import numpy as np

from gpt_jax.errors import UserError

from gpt_jax.align import common, task
from gpt_jax.align.data import encode_prompt, encode_response, load_prompts, strip_stop
from gpt_jax.align.rollout import generate_batched


def run_rank(config) -> dict:
    r = config.rank
    if not 2 <= r.k_min <= r.k_max <= config.reward.max_k:
        raise UserError(f"need 2 <= rank.k_min <= rank.k_max <= reward.max_k, got {r.k_min}, {r.k_max}, "
                        f"{config.reward.max_k}")
    if r.samples < r.k_max:
        raise UserError(f"rank.samples={r.samples} is smaller than rank.k_max={r.k_max}")
    sft_dir = config.align.sft_workdir
    tok = common.tokenizer_of(sft_dir, "align.sft_workdir")
    texts = load_prompts(common.data_path(config, "rank_prompts"))
    model_cfg, signature = common.model_config(config, tok)
    mesh = common.make_mesh(config)
    gpt_abstract, _ = common.abstract_states(config, model_cfg, mesh)
    sft, _ = common.restore_previous(sft_dir, "align.sft_workdir", ("sft",), signature, gpt_abstract)
    prompts = [encode_prompt(tok, p) for p in texts]
    if max(map(len, prompts)) + r.max_new_tokens > model_cfg.block_size:
        raise UserError(f"a ranking prompt with rank.max_new_tokens={r.max_new_tokens} exceeds model.block_size")
    if any(task.answer(p) is None for p in texts):
        raise UserError("the ranking prompts must be task prompts: the scorer plays the labeler")

    repeated = [p for p in prompts for _ in range(r.samples)]
    outs = generate_batched(model_cfg, sft.params, repeated, batch_size=r.batch_size,
                            key=jax.random.key(config.seed + 3), max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, stop_token=tok.eot_id)
    rng = np.random.default_rng((config.seed, 5))
    records, dropped, ks = [], 0, []
    for i, prompt in enumerate(texts):
        distinct = []
        for o in outs[i * r.samples:(i + 1) * r.samples]:
            text = tok.decode(strip_stop(o, tok.eot_id))
            # Text round trips can grow (invalid UTF-8 bytes decode to U+FFFD): keep what the RM can read.
            fits = len(prompts[i]) + len(encode_response(tok, text)) <= model_cfg.block_size
            if text.strip() and fits and text not in distinct:
                distinct.append(text)
        k = min(int(rng.integers(r.k_min, r.k_max + 1)), len(distinct))
        if k < 2:
            dropped += 1
            continue
        ranked, scores = task.rank_responses(prompt, distinct[:k], rng)
        records.append({"prompt": prompt, "responses": ranked, "scores": scores})
        ks.append(k)
    if not records:
        raise UserError("no ranking prompt got 2 distinct responses from the SFT model; sample at a higher "
                        "rank.temperature or with more rank.samples")
    path = common.data_path(config, "rank_data")
    task.write_jsonl(path, records)
    summary = {"path": path, "prompts": len(records), "dropped": dropped, "mean_k": float(np.mean(ks)),
               "mean_score": float(np.mean([s for rec in records for s in rec["scores"]])),
               "ties": float(np.mean([len(set(rec["scores"])) < len(rec["scores"]) for rec in records]))}
    common.log(f"rank: {summary['prompts']} prompts ranked (K mean {summary['mean_k']:.1f}, {dropped} dropped with "
               f"fewer than 2 distinct responses, mean score {summary['mean_score']:.3f}) -> {path}")
    return summary
