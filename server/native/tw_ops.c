/* onnxruntime custom-op library: the `Linear` op of domain `ai.tokenwire`.

   y[..., N] = x[..., K] @ W, W in Q4_1 (bits 4: codes + scale + minimum per block of 32) or
   Q8_0 (bits 8: int8 codes + scale, optional minimum), packed by tokenwire's graph builder
   (server/native_pack.py). Inputs: x float, w uint8 (packed codes), d float (scales),
   m float (minimums, may be empty). Attributes: bits, K, N. Column tiles are spread over
   onnxruntime's own intra-op threads (KernelContext_ParallelFor), so the session's thread
   setting governs this op as it does the others. */
#include <stdio.h>
#include <stdlib.h>

#include <string.h>

#include "tw_attention.h"
#include "tw_blocks.h"
#include "tw_isa.h"
#include "tw_linear.h"
#include "tw_ort_abi.h"

typedef struct {
    const OrtApi *api;
    int64_t bits, k, n;
} LinearKernel;

typedef struct {
    const LinearKernel *kernel;
    const uint8_t *w;
    const float *d, *m, *x;
    int16_t *xq;
    float *sx, *sumx, *y;
    int64_t rows, tiles, chunks;
} LinearJob;

static OrtStatus *fail(const OrtApi *api, const char *msg) { return TW_API(api, CreateStatus)(TW_ORT_INVALID_ARGUMENT, msg); }

#define TRY(expr)                        \
    do {                                 \
        OrtStatus *st_ = (expr);         \
        if (st_ != NULL) return st_;     \
    } while (0)

static OrtStatus *linear_create(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)op;
    LinearKernel *kernel = calloc(1, sizeof(LinearKernel));
    if (kernel == NULL) return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire Linear: out of memory");
    kernel->api = api;
    OrtStatus *st = NULL;
    if ((st = TW_API(api, KernelInfoGetAttribute_int64)(info, "bits", &kernel->bits)) ||
        (st = TW_API(api, KernelInfoGetAttribute_int64)(info, "K", &kernel->k)) ||
        (st = TW_API(api, KernelInfoGetAttribute_int64)(info, "N", &kernel->n))) {
        free(kernel);
        return st;
    }
    if ((kernel->bits != 4 && kernel->bits != 8) || kernel->k <= 0 || kernel->k % TW_BLOCK || kernel->n <= 0) {
        free(kernel);
        return fail(api, "tokenwire Linear: bits must be 4 or 8, K a positive multiple of 32, N positive");
    }
    *out = kernel;
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

static OrtStatus *tensor_shape(const OrtApi *api, const OrtValue *value, int64_t *dims, size_t *rank, size_t *count) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    TRY(TW_API(api, GetTensorTypeAndShape)(value, &info));
    OrtStatus *st = TW_API(api, GetDimensionsCount)(info, rank);
    if (st == NULL && *rank > 8) st = fail(api, "tokenwire Linear: input rank above 8");
    if (st == NULL) st = TW_API(api, GetDimensions)(info, dims, *rank);
    if (st == NULL) st = TW_API(api, GetTensorShapeElementCount)(info, count);
    TW_API(api, ReleaseTensorTypeAndShapeInfo)(info);
    return st;
}

static OrtStatus *element_type(const OrtApi *api, const OrtValue *value, int *type) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    TRY(TW_API(api, GetTensorTypeAndShape)(value, &info));
    OrtStatus *st = TW_API(api, GetTensorElementType)(info, type);
    TW_API(api, ReleaseTensorTypeAndShapeInfo)(info);
    return st;
}

static void run_chunk(void *user, size_t index) {
    const LinearJob *job = user;
    const int64_t t0 = job->tiles * (int64_t)index / job->chunks;
    const int64_t t1 = job->tiles * ((int64_t)index + 1) / job->chunks;
    tw_linear_tiles((int)job->kernel->bits, job->w, job->d, job->m, job->xq, job->sx, job->sumx, job->rows,
                    job->kernel->k, job->kernel->n, job->y, t0, t1);
}

static void quantize_chunk(void *user, size_t index) {
    const LinearJob *job = user;
    const int64_t r0 = job->rows * (int64_t)index / job->chunks;
    const int64_t r1 = job->rows * ((int64_t)index + 1) / job->chunks;
    const int64_t k = job->kernel->k, kb = k / TW_BLOCK;
    tw_quantize_rows(job->x + r0 * k, r1 - r0, k, job->xq + r0 * k, job->sx + r0 * kb, job->sumx + r0 * kb);
}

static OrtStatus *linear_compute(void *opaque, OrtKernelContext *ctx) {
    const LinearKernel *kernel = opaque;
    const OrtApi *api = kernel->api;
    const OrtValue *in[4];
    for (size_t i = 0; i < 4; i++) TRY(TW_API(api, KernelContext_GetInput)(ctx, i, &in[i]));
    int64_t dims[8], wdims[8];
    size_t rank, count, wrank, wcount, drank, dcount, mrank, mcount;
    TRY(tensor_shape(api, in[0], dims, &rank, &count));
    if (rank < 1 || dims[rank - 1] != kernel->k) return fail(api, "tokenwire Linear: x's last dimension is not K");
    const int64_t k = kernel->k, n = kernel->n, kb = k / TW_BLOCK, tiles = (n + TW_TILE - 1) / TW_TILE;
    const int64_t rows = (int64_t)count / k;
    TRY(tensor_shape(api, in[1], wdims, &wrank, &wcount));
    TRY(tensor_shape(api, in[2], wdims, &drank, &dcount));
    TRY(tensor_shape(api, in[3], wdims, &mrank, &mcount));
    const int64_t per_block = kernel->bits == 4 ? 256 : 512;
    if ((int64_t)wcount != tiles * kb * per_block || (int64_t)dcount != tiles * kb * TW_TILE ||
        (mcount != 0 && (int64_t)mcount != tiles * kb * TW_TILE) || (kernel->bits == 4 && mcount == 0))
        return fail(api, "tokenwire Linear: packed weight sizes do not match bits, K and N");
    dims[rank - 1] = n;
    OrtValue *out = NULL;
    TRY(TW_API(api, KernelContext_GetOutput)(ctx, 0, dims, rank, &out));
    if (rows == 0) return NULL;
    LinearJob job = {.kernel = kernel, .rows = rows, .tiles = tiles};
    void *p = NULL;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[0], &p));
    job.x = p;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[1], &p));
    job.w = p;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[2], &p));
    job.d = p;
    job.m = NULL;
    if (mcount != 0) {
        TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[3], &p));
        job.m = p;
    }
    TRY(TW_API(api, GetTensorMutableData)(out, &p));
    job.y = p;
    char *scratch = malloc((size_t)(rows * k) * sizeof(int16_t) + 2 * (size_t)(rows * kb) * sizeof(float));
    if (scratch == NULL) return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire Linear: out of memory");
    job.xq = (int16_t *)scratch;
    job.sx = (float *)(scratch + (size_t)(rows * k) * sizeof(int16_t));
    job.sumx = job.sx + rows * kb;

    OrtStatus *st = NULL;
    if (rows >= 16) {
        job.chunks = rows < 64 ? rows : 64;
        st = TW_API(api, KernelContext_ParallelFor)(ctx, quantize_chunk, (size_t)job.chunks, 0, &job);
    } else {
        tw_quantize_rows(job.x, rows, k, job.xq, job.sx, job.sumx);
    }
    if (st == NULL) {
        job.chunks = tiles < TW_CHUNKS ? tiles : TW_CHUNKS;
        st = TW_API(api, KernelContext_ParallelFor)(ctx, run_chunk, (size_t)job.chunks, 0, &job);
    }
    free(scratch);
    return st;
}

static void compute_v1(void *kernel, OrtKernelContext *ctx) {
    /* Never called: onnxruntime uses KernelComputeV2 for op version >= 16. */
    (void)kernel;
    (void)ctx;
}


/* The OrtCustomOp table of op PREFIX (PREFIX_create, PREFIX_compute, PREFIX_name, ...). At
   version 16 onnxruntime calls the V2 entry points, which report errors as statuses; the V1
   ones are there because older fields must not be NULL. */
#define TW_OP(PREFIX)                                                                                     \
    {                                                                                                     \
        .version = 16, .CreateKernel = create_v1_##PREFIX, .GetName = PREFIX##_name,                      \
        .GetExecutionProviderType = op_provider, .GetInputType = PREFIX##_input_type,                     \
        .GetInputTypeCount = PREFIX##_input_count, .GetOutputType = PREFIX##_output_type,                 \
        .GetOutputTypeCount = PREFIX##_output_count, .KernelCompute = compute_v1,                         \
        .KernelDestroy = destroy_kernel, .GetInputCharacteristic = required,                              \
        .GetOutputCharacteristic = required, .GetInputMemoryType = default_memory,                        \
        .GetVariadicInputMinArity = one, .GetVariadicInputHomogeneity = one,                              \
        .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = one,                            \
        .CreateKernelV2 = PREFIX##_create, .KernelComputeV2 = PREFIX##_compute,                           \
    }

#define TW_CREATE_V1(PREFIX)                                                                              \
    static void *create_v1_##PREFIX(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) { \
        void *kernel = NULL;                                                                              \
        OrtStatus *st = PREFIX##_create(op, api, info, &kernel);                                          \
        if (st != NULL) TW_API(api, ReleaseStatus)(st);                                                   \
        return kernel;                                                                                    \
    }

TW_CREATE_V1(linear)

static const char *linear_name(const TwCustomOp *op) { (void)op; return "Linear"; }
static const char *op_provider(const TwCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int linear_input_type(const TwCustomOp *op, size_t i) { (void)op; return i == 1 ? TW_TENSOR_UINT8 : TW_TENSOR_FLOAT; }
static size_t linear_input_count(const TwCustomOp *op) { (void)op; return 4; }
static int linear_output_type(const TwCustomOp *op, size_t i) { (void)op; (void)i; return TW_TENSOR_FLOAT; }
static size_t linear_output_count(const TwCustomOp *op) { (void)op; return 1; }
static int required(const TwCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int default_memory(const TwCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int one(const TwCustomOp *op) { (void)op; return 1; }

static const TwCustomOp linear_op = TW_OP(linear);

/* ---- Attention ---------------------------------------------------------------------------
   Inputs: qkv float [B, S, (H + 2G) D], past_key / past_value fp16 [B, G, capacity, D],
   seqlens_k int32 [B] (valid positions after this call, minus one), cos / sin float
   [max_pos, D/2], and optionally kv_pages int32 [B, pages_per_row]: then the caches are a pool
   of pages, [pages, G, page size, D] (page size a multiple of 16), and row b's position p is in
   page kv_pages[b, p / page size], so each row holds only the pages its length needs.
   Outputs: attention float [B, S, H D], present_key / present_value (the past buffers when bound
   to the same memory, as the engine does; else a copy is made first).
   Attributes: num_heads, kv_num_heads, scale (any value: it multiplies the rotated queries), and
   kv_format: "float16" (the default) or "int8", where the caches are uint8 with rows of D + D/4
   bytes in place of D halves (tw_kv8.c); optionally sliding_window (int, 0 = none: a query at
   position p sees keys max(0, p - window + 1)..p) and softcap (float, 0 = none: scores =
   softcap * tanh(scores / softcap) after the scale, before the softmax), with either format.
   D (the head size) is a multiple of 16 up to 256; where the graph declares the shapes of qkv or
   the caches, a bad D is refused when the session is created. Per-head q/k norms (qwen3, gemma3)
   belong to the graph, before this op: it takes q and k as given and rotates them. */

typedef struct {
    const OrtApi *api;
    int64_t heads, kv_heads, window;
    float scale, softcap;
    int kv_format;
} AttentionKernel;

/* Why head size d cannot run (NULL when it can). */
static const char *head_dim_problem(int64_t d) {
    return d <= 0 || d % 16 || d > TW_MAX_HEAD_DIM ? "tokenwire Attention: head size must be a multiple of 16, at most 256"
                                                   : NULL;
}

/* The dims input i is declared with in the graph (-1 for a symbolic one); 0 (rank) when unknown. */
static size_t declared_shape(const OrtApi *api, const OrtKernelInfo *info, size_t i, int64_t *dims) {
    OrtTypeInfo *type = NULL;
    const OrtTensorTypeAndShapeInfo *tensor = NULL;
    size_t rank = 0;
    OrtStatus *st = TW_API(api, KernelInfo_GetInputTypeInfo)(info, i, &type);
    if (st == NULL && type != NULL) st = TW_API(api, CastTypeInfoToTensorInfo)(type, &tensor);
    if (st == NULL && tensor != NULL) st = TW_API(api, GetDimensionsCount)(tensor, &rank);
    if (st == NULL && tensor != NULL && rank <= 8) st = TW_API(api, GetDimensions)(tensor, dims, rank);
    if (st != NULL || tensor == NULL || rank > 8) rank = 0;
    if (st != NULL) TW_API(api, ReleaseStatus)(st);
    if (type != NULL) TW_API(api, ReleaseTypeInfo)(type);
    return rank;
}

/* The head size the graph's declared shapes give (qkv's width, else the caches' rows); 0 if unknown. */
static int64_t declared_head_dim(const AttentionKernel *kernel, const OrtKernelInfo *info) {
    int64_t dims[8];
    const int64_t width = kernel->heads + 2 * kernel->kv_heads;
    if (declared_shape(kernel->api, info, 0, dims) == 3 && dims[2] > 0 && dims[2] % width == 0) return dims[2] / width;
    if (declared_shape(kernel->api, info, 1, dims) == 4 && dims[3] > 0) {
        if (kernel->kv_format != TW_KV_INT8) return dims[3];
        return dims[3] % 5 ? 0 : dims[3] / 5 * 4; /* int8 rows: D + D/4 bytes (else refused at run) */
    }
    return 0;
}

/* The optional attributes sliding_window and softcap (0 when absent). */
static void read_window_softcap(const OrtApi *api, const OrtKernelInfo *info, AttentionKernel *kernel) {
    OrtStatus *st = TW_API(api, KernelInfoGetAttribute_int64)(info, "sliding_window", &kernel->window);
    if (st != NULL) {
        TW_API(api, ReleaseStatus)(st);
        kernel->window = 0;
    }
    st = TW_API(api, KernelInfoGetAttribute_float)(info, "softcap", &kernel->softcap);
    if (st != NULL) {
        TW_API(api, ReleaseStatus)(st);
        kernel->softcap = 0.0f;
    }
}

/* The optional string attribute kv_format: TW_KV_FP16 when absent, -1 when not a known format. */
static int read_kv_format(const OrtApi *api, const OrtKernelInfo *info) {
    char name[16] = {0};
    size_t size = sizeof name;
    OrtStatus *st = TW_API(api, KernelInfoGetAttribute_string)(info, "kv_format", name, &size);
    if (st != NULL) {
        TW_API(api, ReleaseStatus)(st);
        return size > sizeof name ? -1 : TW_KV_FP16; /* too long to be a format, or absent */
    }
    return strcmp(name, "float16") == 0 ? TW_KV_FP16 : strcmp(name, "int8") == 0 ? TW_KV_INT8 : -1;
}

static OrtStatus *attention_create(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)op;
    AttentionKernel *kernel = calloc(1, sizeof(AttentionKernel));
    if (kernel == NULL) return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire Attention: out of memory");
    kernel->api = api;
    OrtStatus *st = NULL;
    if ((st = TW_API(api, KernelInfoGetAttribute_int64)(info, "num_heads", &kernel->heads)) ||
        (st = TW_API(api, KernelInfoGetAttribute_int64)(info, "kv_num_heads", &kernel->kv_heads)) ||
        (st = TW_API(api, KernelInfoGetAttribute_float)(info, "scale", &kernel->scale))) {
        free(kernel);
        return st;
    }
    if (kernel->heads <= 0 || kernel->kv_heads <= 0 || kernel->heads % kernel->kv_heads ||
        kernel->heads / kernel->kv_heads > TW_MAX_GROUP) {
        free(kernel);
        return fail(api, "tokenwire Attention: num_heads must be 1 to 8 times kv_num_heads");
    }
    kernel->kv_format = read_kv_format(api, info);
    if (kernel->kv_format < 0) {
        free(kernel);
        return fail(api, "tokenwire Attention: kv_format must be \"float16\" or \"int8\"");
    }
    read_window_softcap(api, info, kernel);
    const char *why = kernel->window < 0 ? "tokenwire Attention: sliding_window must be 0 (none) or a positive number "
                                           "of positions"
                      : !(kernel->softcap >= 0.0f && kernel->softcap <= 3.0e38f)
                          ? "tokenwire Attention: softcap must be 0 (none) or a positive finite number"
                          : NULL;
    const int64_t d = why == NULL ? declared_head_dim(kernel, info) : 0;
    char message[160];
    if (why == NULL && d != 0 && head_dim_problem(d) != NULL) {
        snprintf(message, sizeof message, "%s (the graph's shapes give %lld)", head_dim_problem(d), (long long)d);
        why = message;
    }
    if (why != NULL) {
        free(kernel);
        return fail(api, why);
    }
    *out = kernel;
    return NULL;
}

static void store_rows(void *user, size_t index) {
    const TwAttention *a = user;
    tw_attention_store(a, (int64_t)index / a->seq, (int64_t)index % a->seq);
}

static void store_rows8(void *user, size_t index) {
    const TwAttention *a = user;
    tw_kv8_store_row(a, (int64_t)index / a->seq, (int64_t)index % a->seq);
}

static void store_keys8(void *user, size_t index) {
    const TwAttention *a = user;
    tw_kv8_store_keys(a, (int64_t)index / a->kv_heads, (int64_t)index % a->kv_heads);
}

static void attention_task(void *user, size_t index) { tw_attention_task(user, (int64_t)index); }

static void finish_rows(void *user, size_t index) {
    const TwAttention *a = user;
    tw_attention_finish(a, (int64_t)index / a->seq, (int64_t)index % a->seq);
}

/* Runs fn over [0, n) on onnxruntime's threads when there is enough work, else inline. */
static OrtStatus *parallel(const OrtApi *api, OrtKernelContext *ctx, void (*fn)(void *, size_t), int64_t n,
                           int64_t inline_below, void *user) {
    if (n < inline_below) {
        for (int64_t i = 0; i < n; i++) fn(user, (size_t)i);
        return NULL;
    }
    return TW_API(api, KernelContext_ParallelFor)(ctx, fn, (size_t)n, 0, user);
}

static OrtStatus *attention_compute(void *opaque, OrtKernelContext *ctx) {
    const AttentionKernel *kernel = opaque;
    const OrtApi *api = kernel->api;
    const OrtValue *in[7] = {NULL};
    size_t inputs = 0;
    TRY(TW_API(api, KernelContext_GetInputCount)(ctx, &inputs));
    for (size_t i = 0; i < 7 && i < inputs; i++) TRY(TW_API(api, KernelContext_GetInput)(ctx, i, &in[i]));
    int64_t qdims[8], kdims[8], vdims[8], ldims[8], cdims[8], sdims[8];
    size_t qr, kr, vr, lr, cr, sr, count;
    TRY(tensor_shape(api, in[0], qdims, &qr, &count));
    TRY(tensor_shape(api, in[1], kdims, &kr, &count));
    TRY(tensor_shape(api, in[2], vdims, &vr, &count));
    TRY(tensor_shape(api, in[3], ldims, &lr, &count));
    TRY(tensor_shape(api, in[4], cdims, &cr, &count));
    TRY(tensor_shape(api, in[5], sdims, &sr, &count));
    if (qr != 3 || kr != 4 || vr != 4 || lr != 1 || cr != 2 || sr != 2)
        return fail(api, "tokenwire Attention: expected qkv [B,S,W], past [B,G,capacity,D], seqlens_k [B], "
                         "cos/sin [P,D/2]");
    const int int8 = kernel->kv_format == TW_KV_INT8;
    TwAttention a = {.batch = qdims[0], .seq = qdims[1], .heads = kernel->heads, .kv_heads = kernel->kv_heads,
                     .head_dim = kdims[3], .capacity = kdims[2], .max_pos = cdims[0], .scale = kernel->scale,
                     .window = kernel->window, .softcap = kernel->softcap, .kv_format = kernel->kv_format};
    if (int8) { /* rows of D + D/4 bytes: D from the qkv width */
        const int64_t width = a.heads + 2 * a.kv_heads;
        a.head_dim = qdims[2] % width ? 0 : qdims[2] / width;
        a.row_bytes = a.head_dim + a.head_dim / 4;
    }
    const int64_t d = a.head_dim;
    if (head_dim_problem(d) != NULL) return fail(api, head_dim_problem(d));
    if (qdims[2] != (a.heads + 2 * a.kv_heads) * d) return fail(api, "tokenwire Attention: qkv width is not (H + 2G) * D");
    if (kdims[1] != a.kv_heads || memcmp(kdims, vdims, 4 * sizeof(int64_t)) != 0)
        return fail(api, "tokenwire Attention: past key/value must both be [B, kv_num_heads, capacity, D]");
    int ktype = 0, vtype = 0;
    TRY(element_type(api, in[1], &ktype));
    TRY(element_type(api, in[2], &vtype));
    const int want = int8 ? TW_TENSOR_UINT8 : TW_TENSOR_FLOAT16;
    if (ktype != want || vtype != want)
        return fail(api, int8 ? "tokenwire Attention: kv_format int8 takes uint8 caches"
                              : "tokenwire Attention: kv_format float16 takes float16 caches");
    if (int8 && (kdims[3] != a.row_bytes || a.capacity % TW_KV_BLOCK))
        return fail(api, "tokenwire Attention: an int8 cache is [B or pages, kv_num_heads, capacity (a multiple of "
                         "16), D + D/4] bytes");
    int64_t span = a.capacity; /* positions a row can hold */
    if (in[6] != NULL) {
        int64_t pdims[8];
        size_t pr;
        void *p_pages = NULL;
        TRY(tensor_shape(api, in[6], pdims, &pr, &count));
        if (pr != 2 || pdims[0] != a.batch || a.capacity % TW_KEY_TILE)
            return fail(api, "tokenwire Attention: kv_pages must be [B, pages_per_row] over pages of a multiple of 16");
        TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[6], &p_pages));
        a.pages = p_pages;
        a.pages_per_row = pdims[1];
        span = a.pages_per_row * a.capacity;
    } else if (kdims[0] != a.batch) {
        return fail(api, "tokenwire Attention: past key/value must have one row per batch row");
    }
    if (ldims[0] != a.batch) return fail(api, "tokenwire Attention: seqlens_k must have one entry per row");
    if (cdims[1] != d / 2 || sdims[0] != cdims[0] || sdims[1] != cdims[1])
        return fail(api, "tokenwire Attention: cos/sin caches must be [max_pos, D/2]");
    void *p = NULL;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[3], &p));
    a.seqlens = p;
    for (int64_t b = 0; b < a.batch; b++) {
        const int64_t total = (int64_t)a.seqlens[b] + 1;
        if (total < a.seq || total > span || total > a.max_pos)
            return fail(api, "tokenwire Attention: seqlens_k out of range (fewer than the new tokens, or past capacity)");
        if (a.pages != NULL)
            for (int64_t i = 0; i < (total + a.capacity - 1) / a.capacity; i++)
                if (a.pages[b * a.pages_per_row + i] < 0 || a.pages[b * a.pages_per_row + i] >= kdims[0])
                    return fail(api, "tokenwire Attention: kv_pages names a page outside the pool");
    }
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[0], &p));
    a.qkv = p;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[4], &p));
    a.cos = p;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[5], &p));
    a.sin = p;
    int64_t odims[3] = {a.batch, a.seq, a.heads * d};
    OrtValue *out = NULL, *present_k = NULL, *present_v = NULL;
    TRY(TW_API(api, KernelContext_GetOutput)(ctx, 0, odims, 3, &out));
    TRY(TW_API(api, KernelContext_GetOutput)(ctx, 1, kdims, 4, &present_k));
    TRY(TW_API(api, KernelContext_GetOutput)(ctx, 2, vdims, 4, &present_v));
    TRY(TW_API(api, GetTensorMutableData)(out, &p));
    a.out = p;
    const size_t cache_bytes = (size_t)(kdims[0] * a.kv_heads * a.capacity) * (int8 ? (size_t)a.row_bytes : (size_t)d * 2);
    void *past = NULL;
    TRY(TW_API(api, GetTensorMutableData)(present_k, &p));
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[1], &past));
    if (p != past) memcpy(p, past, cache_bytes);
    a.key = p;
    a.key8 = p;
    TRY(TW_API(api, GetTensorMutableData)(present_v, &p));
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[2], &past));
    if (p != past) memcpy(p, past, cache_bytes);
    a.value = p;
    a.value8 = p;
    if (a.batch * a.seq == 0) return NULL;

    const int64_t partial_floats = tw_attention_plan(&a);
    const size_t q_floats = (size_t)(a.batch * a.seq * a.heads * d);
    const size_t k_floats = int8 ? (size_t)(a.batch * a.seq * a.kv_heads * d) : 0;
    float *scratch = malloc(sizeof(float) * (q_floats + k_floats + (size_t)partial_floats));
    if (scratch == NULL) return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire Attention: out of memory");
    a.q = scratch;
    a.k_rot = scratch + q_floats;
    a.partial = scratch + q_floats + k_floats;
    OrtStatus *st = parallel(api, ctx, int8 ? store_rows8 : store_rows, a.batch * a.seq, 16, &a);
    /* int8 keys go in position order per (row, KV head): a block's scales depend on its earlier keys */
    if (st == NULL && int8) /* a decode step's keys are a few hundred values: inline */
        st = parallel(api, ctx, store_keys8, a.batch * a.kv_heads, a.batch * a.seq < 16 ? INT64_MAX : 2, &a);
    if (st == NULL) st = parallel(api, ctx, attention_task, tw_attention_tasks(&a), 2, &a);
    if (st == NULL) st = parallel(api, ctx, finish_rows, a.batch * a.seq, 16, &a);
    free(scratch);
    return st;
}

static const char *attention_name(const TwCustomOp *op) { (void)op; return "Attention"; }
/* Two kernels of one op, by the caches' type: fp16 (kv_format "float16") and uint8 ("int8"). */
static int cache_input_type(size_t i, int cache) {
    return i == 1 || i == 2 ? cache : i == 3 || i == 6 ? TW_TENSOR_INT32 : TW_TENSOR_FLOAT;
}
static int attention_input_type(const TwCustomOp *op, size_t i) { (void)op; return cache_input_type(i, TW_TENSOR_FLOAT16); }
static int attention8_input_type(const TwCustomOp *op, size_t i) { (void)op; return cache_input_type(i, TW_TENSOR_UINT8); }
static size_t attention_input_count(const TwCustomOp *op) { (void)op; return 7; }
/* kv_pages (input 6) is optional: a graph without it keeps one dense row per sequence. */
static int attention_input_characteristic(const TwCustomOp *op, size_t i) { (void)op; return i == 6 ? 1 : 0; }
static int attention_output_type(const TwCustomOp *op, size_t i) { (void)op; return i == 0 ? TW_TENSOR_FLOAT : TW_TENSOR_FLOAT16; }
static int attention8_output_type(const TwCustomOp *op, size_t i) { (void)op; return i == 0 ? TW_TENSOR_FLOAT : TW_TENSOR_UINT8; }
static size_t attention_output_count(const TwCustomOp *op) { (void)op; return 3; }

TW_CREATE_V1(attention)
#define TW_ATTENTION_OP(INPUT_TYPE, OUTPUT_TYPE)                                                          \
    {                                                                                                     \
        .version = 16, .CreateKernel = create_v1_attention, .GetName = attention_name,                    \
        .GetExecutionProviderType = op_provider, .GetInputType = INPUT_TYPE,                              \
        .GetInputTypeCount = attention_input_count, .GetOutputType = OUTPUT_TYPE,                         \
        .GetOutputTypeCount = attention_output_count, .KernelCompute = compute_v1,                        \
        .KernelDestroy = destroy_kernel, .GetInputCharacteristic = attention_input_characteristic,        \
        .GetOutputCharacteristic = required, .GetInputMemoryType = default_memory,                        \
        .GetVariadicInputMinArity = one, .GetVariadicInputHomogeneity = one,                              \
        .GetVariadicOutputMinArity = one, .GetVariadicOutputHomogeneity = one,                            \
        .CreateKernelV2 = attention_create, .KernelComputeV2 = attention_compute,                         \
    }
static const TwCustomOp attention_op = TW_ATTENTION_OP(attention_input_type, attention_output_type);
static const TwCustomOp attention8_op = TW_ATTENTION_OP(attention8_input_type, attention8_output_type);

/* ---- BlockLinear / BlockGather -----------------------------------------------------------
   A GGUF tensor's own blocks, packed by server/build/gguf_pack.py (tw_blocks.h): codes uint8 and
   meta uint8 (scales / minimums at the file's precision). Attributes: qtype (the GGML type id),
   K (GGUF ne[0]) and N (ne[1]).
   BlockLinear(x float [..., K], codes, meta) -> y float [..., N]: y = x @ W, W[k, n] the tensor's
   row n, element k (tw_blocks.c; float types in fp32, the others with x rounded to int16 per
   block of 32, as Linear). BlockGather(ids int64 [...], codes, meta) -> float [..., K]: the rows
   ids of the tensor (an embedding lookup, a tied lm_head's initializers), exactly dequantized. */

typedef struct {
    const OrtApi *api;
    const char *name;
    int64_t qtype, k, n;
    TwBlockFormat format;
} BlockKernel;

typedef struct {
    TwBlockLinear lin;
    int16_t *xq; /* lin's int16 activations, sx, sumx and xsum16, written by block_quantize_chunk */
    float *sx, *sumx;
    int32_t *xsum16; /* NULL for the types without an offset */
    int64_t tiles, chunks;
} BlockJob;

typedef struct {
    const BlockKernel *kernel;
    const uint8_t *codes, *meta;
    const int64_t *ids;
    float *out;
} GatherJob;

static OrtStatus *block_create(const OrtApi *api, const OrtKernelInfo *info, const char *name, void **out) {
    BlockKernel *kernel = calloc(1, sizeof(BlockKernel));
    if (kernel == NULL) return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire: out of memory");
    *kernel = (BlockKernel){.api = api, .name = name};
    OrtStatus *st = NULL;
    if ((st = TW_API(api, KernelInfoGetAttribute_int64)(info, "qtype", &kernel->qtype)) ||
        (st = TW_API(api, KernelInfoGetAttribute_int64)(info, "K", &kernel->k)) ||
        (st = TW_API(api, KernelInfoGetAttribute_int64)(info, "N", &kernel->n))) {
        free(kernel);
        return st;
    }
    char message[200];
    message[0] = 0;
    if (kernel->qtype < 0 || kernel->qtype > 255 || !tw_block_format((int)kernel->qtype, &kernel->format))
        snprintf(message, sizeof message, "tokenwire %s: qtype %lld is not one it computes (GGML ids of F32, F16, "
                 "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)", name, (long long)kernel->qtype);
    else if (kernel->k <= 0 || kernel->n <= 0 || kernel->k % kernel->format.block)
        snprintf(message, sizeof message, "tokenwire %s: K (%lld) must be a positive multiple of the type's block "
                 "(%lld), N (%lld) positive", name, (long long)kernel->k, (long long)kernel->format.block,
                 (long long)kernel->n);
    if (message[0]) {
        free(kernel);
        return fail(api, message);
    }
    *out = kernel;
    return NULL;
}

static OrtStatus *block_linear_create(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)op;
    return block_create(api, info, "BlockLinear", out);
}

static OrtStatus *block_gather_create(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    (void)op;
    return block_create(api, info, "BlockGather", out);
}

/* Inputs 1 and 2 (codes, meta), checked against the sizes qtype, K and N give. */
static OrtStatus *block_weights(const BlockKernel *kernel, OrtKernelContext *ctx, const uint8_t **codes,
                                const uint8_t **meta) {
    const OrtApi *api = kernel->api;
    const OrtValue *in[2];
    int64_t dims[8];
    size_t rank, count[2];
    for (size_t i = 0; i < 2; i++) {
        TRY(TW_API(api, KernelContext_GetInput)(ctx, i + 1, &in[i]));
        TRY(tensor_shape(api, in[i], dims, &rank, &count[i]));
    }
    const int64_t want_codes = tw_block_code_size(&kernel->format, kernel->k, kernel->n);
    const int64_t want_meta = tw_block_meta_size(&kernel->format, kernel->k, kernel->n);
    if ((int64_t)count[0] != want_codes || (int64_t)count[1] != want_meta) {
        char message[200];
        snprintf(message, sizeof message, "tokenwire %s: packed sizes (%zu codes, %zu meta bytes) do not match qtype "
                 "%lld, K and N (%lld, %lld)", kernel->name, count[0], count[1], (long long)kernel->qtype,
                 (long long)want_codes, (long long)want_meta);
        return fail(api, message);
    }
    void *p = NULL;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[0], &p));
    *codes = p;
    *meta = NULL;
    if (want_meta > 0) {
        TRY(TW_API(api, GetTensorMutableData)((OrtValue *)in[1], &p));
        *meta = p;
    }
    return NULL;
}

/* Input 0 (x or ids) and its shape. */
static OrtStatus *block_input(const BlockKernel *kernel, OrtKernelContext *ctx, const OrtValue **value, int64_t *dims,
                              size_t *rank, size_t *count) {
    TRY(TW_API(kernel->api, KernelContext_GetInput)(ctx, 0, value));
    return tensor_shape(kernel->api, *value, dims, rank, count);
}

static void block_quantize_chunk(void *user, size_t index) {
    const BlockJob *job = user;
    const TwBlockLinear *lin = &job->lin;
    const int64_t r0 = lin->rows * (int64_t)index / job->chunks, r1 = lin->rows * ((int64_t)index + 1) / job->chunks;
    const int64_t kb = lin->k / TW_BLOCK;
    tw_quantize_rows(lin->x + r0 * lin->k, r1 - r0, lin->k, job->xq + r0 * lin->k, job->sx + r0 * kb, job->sumx + r0 * kb);
    if (job->xsum16 != NULL) tw_block_xsums(job->xq + r0 * lin->k, r1 - r0, lin->k, job->xsum16 + r0 * lin->k / 16);
}

static void block_tiles_chunk(void *user, size_t index) {
    const BlockJob *job = user;
    tw_block_tiles(&job->lin, job->tiles * (int64_t)index / job->chunks, job->tiles * ((int64_t)index + 1) / job->chunks);
}

static OrtStatus *block_linear_compute(void *opaque, OrtKernelContext *ctx) {
    const BlockKernel *kernel = opaque;
    const OrtApi *api = kernel->api;
    const OrtValue *x = NULL;
    int64_t dims[8];
    size_t rank, count;
    TRY(block_input(kernel, ctx, &x, dims, &rank, &count));
    if (rank < 1 || dims[rank - 1] != kernel->k) return fail(api, "tokenwire BlockLinear: x's last dimension is not K");
    const int64_t k = kernel->k, kb = k / TW_BLOCK;
    BlockJob job = {.lin = {.qtype = (int)kernel->qtype, .rows = (int64_t)count / k, .k = k, .n = kernel->n},
                    .tiles = (kernel->n + TW_TILE - 1) / TW_TILE};
    TRY(block_weights(kernel, ctx, &job.lin.codes, &job.lin.meta));
    dims[rank - 1] = kernel->n;
    OrtValue *out = NULL;
    void *p = NULL;
    TRY(TW_API(api, KernelContext_GetOutput)(ctx, 0, dims, rank, &out));
    if (job.lin.rows == 0) return NULL;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)x, &p));
    job.lin.x = p;
    TRY(TW_API(api, GetTensorMutableData)(out, &p));
    job.lin.y = p;
    const int64_t rows = job.lin.rows;
    char *scratch = NULL;
    OrtStatus *st = NULL;
    if (!kernel->format.is_float) {
        const size_t sums = tw_block_offset((int)kernel->qtype) ? (size_t)(rows * k / 16) : 0;
        scratch = malloc((size_t)(rows * k) * sizeof(int16_t) + (2 * (size_t)(rows * kb) + sums) * sizeof(float));
        if (scratch == NULL) return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire BlockLinear: out of memory");
        job.lin.xq = job.xq = (int16_t *)scratch;
        job.lin.sx = job.sx = (float *)(scratch + (size_t)(rows * k) * sizeof(int16_t));
        job.lin.sumx = job.sumx = job.sx + rows * kb;
        job.lin.xsum16 = job.xsum16 = sums ? (int32_t *)(job.sumx + rows * kb) : NULL;
        job.chunks = rows < 64 ? rows : 64;
        st = parallel(api, ctx, block_quantize_chunk, job.chunks, 16, &job);
    }
    if (st == NULL) {
        job.chunks = job.tiles < TW_CHUNKS ? job.tiles : TW_CHUNKS;
        st = TW_API(api, KernelContext_ParallelFor)(ctx, block_tiles_chunk, (size_t)job.chunks, 0, &job);
    }
    free(scratch);
    return st;
}

static void gather_row(void *user, size_t index) {
    const GatherJob *job = user;
    const BlockKernel *kernel = job->kernel;
    tw_block_row((int)kernel->qtype, job->codes, job->meta, kernel->k, job->ids[index], job->out + (int64_t)index * kernel->k);
}

static OrtStatus *block_gather_compute(void *opaque, OrtKernelContext *ctx) {
    const BlockKernel *kernel = opaque;
    const OrtApi *api = kernel->api;
    const OrtValue *ids = NULL;
    int64_t dims[8];
    size_t rank, count;
    TRY(block_input(kernel, ctx, &ids, dims, &rank, &count));
    if (rank > 7) return fail(api, "tokenwire BlockGather: ids of rank above 7");
    GatherJob job = {.kernel = kernel};
    TRY(block_weights(kernel, ctx, &job.codes, &job.meta));
    void *p = NULL;
    TRY(TW_API(api, GetTensorMutableData)((OrtValue *)ids, &p));
    job.ids = p;
    for (size_t i = 0; i < count; i++)
        if (job.ids[i] < 0 || job.ids[i] >= kernel->n) return fail(api, "tokenwire BlockGather: an id is outside [0, N)");
    dims[rank] = kernel->k;
    OrtValue *out = NULL;
    TRY(TW_API(api, KernelContext_GetOutput)(ctx, 0, dims, rank + 1, &out));
    if (count == 0) return NULL;
    TRY(TW_API(api, GetTensorMutableData)(out, &p));
    job.out = p;
    return parallel(api, ctx, gather_row, (int64_t)count, 16, &job);
}

TW_CREATE_V1(block_linear)
TW_CREATE_V1(block_gather)

static const char *block_linear_name(const TwCustomOp *op) { (void)op; return "BlockLinear"; }
static const char *block_gather_name(const TwCustomOp *op) { (void)op; return "BlockGather"; }
static int block_linear_input_type(const TwCustomOp *op, size_t i) { (void)op; return i == 0 ? TW_TENSOR_FLOAT : TW_TENSOR_UINT8; }
static int block_gather_input_type(const TwCustomOp *op, size_t i) { (void)op; return i == 0 ? TW_TENSOR_INT64 : TW_TENSOR_UINT8; }
static size_t block_linear_input_count(const TwCustomOp *op) { (void)op; return 3; }
static size_t block_gather_input_count(const TwCustomOp *op) { (void)op; return 3; }
#define block_linear_output_type linear_output_type
#define block_gather_output_type linear_output_type
#define block_linear_output_count linear_output_count
#define block_gather_output_count linear_output_count

static const TwCustomOp block_linear_op = TW_OP(block_linear);
static const TwCustomOp block_gather_op = TW_OP(block_gather);

/* Entry point onnxruntime calls from SessionOptions.register_custom_ops_library. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(TW_ORT_API_VERSION);
    if (api == NULL) return NULL; /* onnxruntime older than 1.17: nothing registered, the graph won't load */
    if (tw_isa() == TW_ISA_NONE)
        return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire native kernels need AVX2, FMA and F16C");
    OrtCustomOpDomain *domain = NULL;
    TRY(TW_API(api, CreateCustomOpDomain)("ai.tokenwire", &domain));
    TRY(TW_API(api, CustomOpDomain_Add)(domain, &linear_op));
    TRY(TW_API(api, CustomOpDomain_Add)(domain, &attention_op));
    TRY(TW_API(api, CustomOpDomain_Add)(domain, &attention8_op));
    TRY(TW_API(api, CustomOpDomain_Add)(domain, &block_linear_op));
    TRY(TW_API(api, CustomOpDomain_Add)(domain, &block_gather_op));
    return TW_API(api, AddCustomOpDomain)(options, domain);
}

/* For the loader: the instruction set the kernels run with here ("avx512", "avx2"; "" = none). */
__attribute__((visibility("default"))) const char *tw_native_isa(void) {
    return tw_isa() == TW_ISA_AVX512 ? "avx512" : tw_isa() == TW_ISA_AVX2 ? "avx2" : "";
}
