"""The mmproj export run by llama.cpp's multimodal library itself (llama-cpp-python's ``mtmd`` bindings): the image
embedding of one image for a pruned tiny LLaVA (two CLIP layers read, of different widths, zero-padded) against
PyTorch's projector output, F32 weights.

The vendored llama.cpp (ggml-org/llama.cpp@0c1e57098) builds LLaVA's CLIP input with the class token *after* the
patches (``tools/mtmd/models/llava.cpp``: ``ggml_concat(inp, class_embedding)``), adds the position embeddings in
that order, and drops the first row as if it were the class token; Hugging Face's CLIP puts the class token first.
So llama.cpp's embedding of any LLaVA mmproj file (ours or one from its own converter) is not the transformers
model's: the patches get their neighbour's position, the first patch is dropped and the class token is passed on.
The test pins both facts: llama.cpp equals PyTorch's modules run in llama.cpp's token order within 1e-3 (the file is
read as written: padded heads, widths, feature layer, activations), and differs from transformers' own
``get_image_features`` by more than 1e-2 (when a llama.cpp release restores the class-token-first order, that
assertion fails and the first comparison should move to ``get_image_features``)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from ukmp.export import export

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="needs llama-cpp-python of the export extra (no wheel; pip builds it from source): "
                        "pip install 'ukmp[export]'")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp", reason="needs llama-cpp-python with its mtmd bindings (0.3.36+) "
                                                        "of the export extra: pip install 'ukmp[export]'")

TOL = 1e-3  # F32 weights; llama.cpp sums in another order and its CPU GELU kernels use fp16 lookup tables
MEAN = [0.48145466, 0.4578275, 0.40821073]  # the tiny LLaVA processor's (CLIP's)
STD = [0.26862954, 0.26130258, 0.27577711]


def llama_cpp_image_embedding(lm_path, mmproj_path, image: np.ndarray) -> np.ndarray:
    """llama.cpp's projector output for one RGB uint8 image (rows: image tokens)."""
    model = llama_cpp.llama_model_load_from_file(str(lm_path).encode(), llama_cpp.llama_model_default_params())
    assert model, "llama.cpp could not load the language model"
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 1, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, params)
    assert ctx, "llama.cpp's multimodal loader refused the mmproj file"
    chunks = mtmd.mtmd_input_chunks_init()
    bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0],
                                   (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes()))
    try:
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(marker, len(marker), False, True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        n_embd = llama_cpp.llama_model_n_embd(model)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                out = mtmd.mtmd_get_output_embd(ctx)
                return np.ctypeslib.as_array(out, shape=(n * n_embd,)).reshape(n, n_embd).copy()
        raise AssertionError("no image chunk")
    finally:
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


def pixels_of(image: np.ndarray) -> torch.Tensor:
    x = (torch.from_numpy(image).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(2, 0, 1)[None]


def in_llama_cpp_token_order(model, pixels: torch.Tensor) -> torch.Tensor:
    """The LLaVA model's own modules run in the vendored llama.cpp's token order: [patches, class token] + position
    rows 0..n, every layer the model reads, the first row dropped, the projector."""
    tower = model.model.vision_tower
    emb = tower.embeddings
    with torch.no_grad():
        x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([x, emb.class_embedding[None, None]], 1) + emb.position_embedding.weight
        x = tower.pre_layrnorm(x)
        for layer in tower.encoder.layers[:model.config.vision_feature_layer]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return model.model.multi_modal_projector(x[:, 1:])[0]


@pytest.mark.slow  # ~1 s once llama-cpp-python is built
@pytest.mark.parametrize("case", ["llava_deep", "llava_64"])  # llava_64: an MLP of hidden_size channels, written
def test_llama_cpp_reads_the_mmproj_file_as_written(make_pruned, image_features, tmp_path, case):  # with 65
    model, _, path, dense = make_pruned(tmp_path, case, torch.float32)
    export(path, "gguf", tmp_path / "lm.gguf", mmproj=tmp_path / "mm.gguf")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the model's size: no resize
    got = llama_cpp_image_embedding(tmp_path / "lm.gguf", tmp_path / "mm.gguf", image)
    pixels = pixels_of(image)
    ref = in_llama_cpp_token_order(model, pixels).numpy()
    assert got.shape == ref.shape == (16, 64)
    assert np.abs(got - ref).max() <= TOL  # measured 2.2e-5 / 3.2e-5 (llava_64 written as kept: 1.3e-2)
    other = in_llama_cpp_token_order(dense, pixels).numpy()
    assert np.abs(other - ref).max() > 1e-2  # the tolerance tells the pruned model from the dense one
    # the vendored llama.cpp's class-token order (module docstring): not transformers' LLaVA, by design of its graph
    assert np.abs(got - image_features(model, pixels).numpy()).max() > 1e-2
