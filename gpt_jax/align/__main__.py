from gpt_jax.align.cli import main

main()
