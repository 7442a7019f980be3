"""Lesson 10's ports of llama.cpp's C code to PyTorch, too long for the lesson's own module:
qkx.py and qx.py (ggml/src/ggml-quants.c: the K-quant and importance-matrix quantizers, bit for
bit), llama_quant.py (src/llama-quant.cpp: which type each tensor of a file type gets).
quantcourse/lesson10_kquants_and_imatrix.py re-exports what the lesson uses.
"""
