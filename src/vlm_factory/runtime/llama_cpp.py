"""Answer VQA questions with llama.cpp: LLM GGUF + mmproj through libmtmd (llama-cpp-python).

The adapter talks to libmtmd directly instead of going through llama-cpp-python's chat handlers,
because those change what the model sees: their Jinja environment trims the newline after a block
tag (the bundled template has `\\n<image>`) and their sampler applies a repeat penalty of 1.1 even at
temperature 0. Here the prompt is the export's PromptSpec (the model family's, rendered from the
checkpoint's own chat template) with its image token swapped for libmtmd's media marker,
tokenized by libmtmd with special tokens added exactly when the reference tokenizer adds them
(`add_special_tokens`), and decoding is a plain argmax over the last logits (runtime/prompting.py's
greedy loop), so answers compare question by question.

Tiling projectors (Idefics3/SmolVLM, projector "idefics3"): libmtmd cuts the image into tiles + a
global view itself and writes the layout text around them itself (`<fake_token_around_image>
<row_r_col_c>` before each tile, "\n" between rows of tiles, then "\n\n" `<fake_token_around_image>
<global-img>` + the global view + `<fake_token_around_image>`: the processor's expansion of `<image>`),
so the PromptSpec's one `<image>` becomes the media marker here too, and `image_embeddings` returns
every view's embeddings in that order (tiles row-major, then the global view), the reference's order.
libmtmd looks those layout strings up as single tokens of the vocabulary: one that is missing
would be fed as token -1, so it is refused when the pair is opened.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from PIL import Image

from vlm_factory.errors import UserError
from vlm_factory.families.base import PromptSpec
from vlm_factory.model.prompt import MAX_ANSWER_TOKENS, Answer
from vlm_factory.runtime.gguf_check import check_llamacpp_pair
from vlm_factory.runtime.prompting import AnswersOneByOne, greedy_decode


KV_CACHE_TYPES = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0"}
# The text libmtmd's idefics3 layout looks up as single vocabulary tokens (mtmd.cpp, init_vision).
IDEFICS3_LAYOUT_TOKENS = ("\n", "\n\n", "<fake_token_around_image>", "<global-img>")


class LlamaCppRuntime(AnswersOneByOne):
    """A loaded LLM + mmproj pair.

    `kv_cache` is the KV-cache type the device will use (a tier's kv_cache_dtype); "f32" keeps
    llama.cpp exact for numeric checks (the F16 cache alone moves log-probs by ~5e-3). `prompt` is
    the export's PromptSpec (see runtime/open.py); image embeddings need none.
    """

    def __init__(self, llm_path: Path, mmproj_path: Path, n_ctx: int = 256, kv_cache: str = "f32",
                 n_threads: int | None = None, prompt: PromptSpec | None = None):
        import llama_cpp
        from llama_cpp import _logger, mtmd_cpp

        # Readable, the right kinds, and every tensor name and shape what llama.cpp's loaders expect:
        # libmtmd would otherwise crash on an mmproj with one tensor renamed.
        projector = check_llamacpp_pair(llm_path, mmproj_path)
        if kv_cache not in KV_CACHE_TYPES:
            raise UserError(f"KV cache type {kv_cache!r}: llama.cpp runs {', '.join(KV_CACHE_TYPES)}")
        self._lib = llama_cpp
        self._mtmd = mtmd_cpp
        # libmtmd logs every image it encodes; route it through llama-cpp-python's (quiet) logger.
        mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        cache_type = getattr(llama_cpp, KV_CACHE_TYPES[kv_cache])
        try:
            self._llm = llama_cpp.Llama(model_path=str(llm_path), n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                                        n_threads=n_threads, type_k=cache_type, type_v=cache_type)
        except ValueError as error:  # llama-cpp-python's message for any file llama.cpp cannot load
            raise UserError(f"{llm_path}: llama.cpp cannot load this GGUF ({error}); re-export it") from None
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = self._llm.n_threads
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self._llm.model, params)
        if not self._ctx:
            raise UserError(f"{mmproj_path}: libmtmd cannot load this mmproj GGUF; re-export it")
        self._llm._stack.callback(mtmd_cpp.mtmd_free, self._ctx)
        self._marker = mtmd_cpp.mtmd_default_marker().decode()
        self._eos = {self._llm.token_eos()}
        self._prompt = prompt
        if projector == "idefics3":
            self._check_layout_tokens(llm_path)

    def _check_layout_tokens(self, llm_path: Path) -> None:
        for text in IDEFICS3_LAYOUT_TOKENS:
            ids = self._llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(ids) != 1:
                self.close()
                raise UserError(f"{llm_path}: the vocabulary has no single token for {text!r} ({len(ids)} tokens); "
                                "libmtmd's idefics3 image layout needs one, as SmolVLM's tokenizer has")

    def close(self) -> None:
        self._llm.close()

    def __enter__(self) -> "LlamaCppRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building blocks -------------------------------------------------------------------------

    def _bitmap(self, image: Image.Image):
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = self._mtmd.mtmd_bitmap_init(image.width, image.height, data)  # copies the pixels
        if not bitmap:
            raise RuntimeError("libmtmd could not create a bitmap")
        return bitmap

    def _tokenize(self, text: str, image: Image.Image, add_special: bool = True):
        """libmtmd's chunks (text tokens and image tokens) for `text` with one media marker."""
        mtmd = self._mtmd
        chunks = mtmd.mtmd_input_chunks_init()
        bitmap = self._bitmap(image)
        try:
            encoded = text.encode()
            source = mtmd.mtmd_input_text(text=encoded, text_len=len(encoded), add_special=add_special,
                                         parse_special=True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), bitmaps, 1)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"libmtmd failed to tokenize the prompt (status {status})")
        return chunks

    def _prompt_text(self, question: str) -> str:
        if self._prompt is None:
            raise ValueError("LlamaCppRuntime needs the export's prompt (prompt=PromptSpec) to answer questions")
        return self._prompt.render(question).replace(self._prompt.image_token, self._marker)

    def prompt_tokens(self, image: Image.Image, question: str) -> list[int | None]:
        """The prompt as libmtmd lays it out for the LLM: text token ids, None for each image embedding
        (what the reference tokenizer's expanded prompt has an image token for)."""
        mtmd = self._mtmd
        chunks = self._tokenize(self._prompt_text(question), image, add_special=self._prompt.add_special_tokens)
        tokens: list[int | None] = []
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens += [int(ids[j]) for j in range(n.value)]
                else:
                    tokens += [None] * mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return tokens

    def _prefill(self, image: Image.Image, question: str) -> None:
        """Evaluate the prompt (text, image, text) into a fresh KV cache; logits of its last token remain."""
        text = self._prompt_text(question)
        llm = self._llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        chunks = self._tokenize(text, image, add_special=self._prompt.add_special_tokens)
        try:
            n_past = self._lib.llama_pos(0)
            status = self._mtmd.mtmd_helper_eval_chunks(self._ctx, llm._ctx.ctx, chunks, 0, 0, llm.n_batch, True,
                                                        ctypes.byref(n_past))
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)
        if status != 0:
            raise RuntimeError(f"libmtmd failed to evaluate the prompt (status {status})")
        llm.n_tokens = n_past.value

    def _step(self, token: int) -> np.ndarray:
        self._llm.eval([token])
        return self._last_logits()

    def text_token_ids(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens parsed), as libmtmd tokenizes prompt text."""
        return self._llm.tokenize(text.encode(), add_bos=add_special, special=True)

    def _last_logits(self) -> np.ndarray:
        pointer = self._lib.llama_get_logits_ith(self._llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),)).copy()

    # -- the adapter interface -------------------------------------------------------------------

    def first_token_logits(self, image: Image.Image, question: str) -> np.ndarray:
        """Logits over the vocabulary for the first answer token."""
        self._prefill(image, question)
        return self._last_logits()

    def answer_one(self, image: Image.Image, question: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> Answer:
        self._prefill(image, question)
        decoded = greedy_decode(self._last_logits(), self._step, self._eos, max_new_tokens)
        text = self._llm.detokenize(decoded.tokens).decode("utf-8", errors="replace").strip()
        return Answer(text, decoded.first_logits, decoded.truncated)

    def image_views(self, image: Image.Image) -> list[np.ndarray]:
        """The mmproj's output for each view libmtmd makes of one image, in prompt order (one view for an
        "mlp" or "ldpv2" projector; tiles row-major then the global view for "idefics3"): [(tokens, LLM hidden
        size)]."""
        mtmd = self._mtmd
        chunks = self._tokenize(self._marker, image)
        views = []
        try:
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
                        raise RuntimeError("libmtmd failed to encode the image")
                    n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    pointer = mtmd.mtmd_get_output_embd(self._ctx)
                    views.append(np.ctypeslib.as_array(pointer, shape=(n_tokens, self._llm.n_embd())).copy())
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        if not views:
            raise RuntimeError("libmtmd produced no image chunk")
        return views

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """What the LLM receives for one image: (views x image tokens, LLM hidden size), views in prompt order."""
        return np.concatenate(self.image_views(image))
