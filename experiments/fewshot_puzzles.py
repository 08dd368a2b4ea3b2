"""Few-shot against zero-shot on CPU, where the examples carry something the prompt alone does not.

Same model family and mixture as experiments/fewshot_demo.py, with the word-scrambling blocks taken
from the `wordpuzzles` source: each block writes its answers either in lowercase ("objects") or
Capitalized ("Objects"), one style per block, as puzzle answer keys do. The evaluated tasks want
lowercase. A zero-shot prompt (description and the scrambled word) does not say which style is
wanted; a few-shot prompt shows it. Context 256, so 3-shot random_insertion prompts fit.
On CPU (17 min): random_insertion 0.413 / 0.877 / 0.893 at 0 / 1 / 3 shots, 0.850 zero-shot
ignoring case (BENCHMARKS.md): the examples buy the format, not the skill.

    python -m gpt_jax.train --config experiments/fewshot_puzzles.py --workdir runs/fewshot_puzzles
    python -m gpt_jax.evaluate --workdir runs/fewshot_puzzles \\
        --task random_insertion,reversed_words,cycle_letters --shots 0,1,3 --n 300
"""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(__file__), "fewshot_demo.py"))["get_config"]()
    c.model.update(block_size=256)
    c.data.update(mixture="stdlib:0.05,arith:0.05,wordpuzzles:0.9")
    return c
