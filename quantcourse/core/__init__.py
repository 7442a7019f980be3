"""What several lessons share, in the order each module may import the earlier ones:

machine, config, memory, models, images, llama_cpp, generation, sizes, timing, evaluation, surgery, benchmark.
"""
