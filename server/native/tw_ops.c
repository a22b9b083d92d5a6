/* onnxruntime custom-op library: the `Linear` op of domain `ai.tokenwire`.

   y[..., N] = x[..., K] @ W, W in Q4_1 (bits 4: codes + scale + minimum per block of 32) or
   Q8_0 (bits 8: int8 codes + scale, optional minimum), packed by tokenwire's graph builder
   (server/native_pack.py). Inputs: x float, w uint8 (packed codes), d float (scales),
   m float (minimums, may be empty). Attributes: bits, K, N. Column tiles are spread over
   onnxruntime's own intra-op threads (KernelContext_ParallelFor), so the session's thread
   setting governs this op as it does the others. */
#include <stdio.h>
#include <stdlib.h>

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

static OrtStatus *create_kernel(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
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

static OrtStatus *compute(void *opaque, OrtKernelContext *ctx) {
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

static void *create_v1(const TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    void *kernel = NULL;
    OrtStatus *st = create_kernel(op, api, info, &kernel);
    if (st != NULL) TW_API(api, ReleaseStatus)(st);
    return kernel;
}

static const char *op_name(const TwCustomOp *op) { (void)op; return "Linear"; }
static const char *op_provider(const TwCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const TwCustomOp *op, size_t i) { (void)op; return i == 1 ? TW_TENSOR_UINT8 : TW_TENSOR_FLOAT; }
static size_t input_count(const TwCustomOp *op) { (void)op; return 4; }
static int output_type(const TwCustomOp *op, size_t i) { (void)op; (void)i; return TW_TENSOR_FLOAT; }
static size_t output_count(const TwCustomOp *op) { (void)op; return 1; }
static int required(const TwCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int default_memory(const TwCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int one(const TwCustomOp *op) { (void)op; return 1; }

static const TwCustomOp linear_op = {
    .version = 16,
    .CreateKernel = create_v1,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = input_type,
    .GetInputTypeCount = input_count,
    .GetOutputType = output_type,
    .GetOutputTypeCount = output_count,
    .KernelCompute = compute_v1,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = required,
    .GetOutputCharacteristic = required,
    .GetInputMemoryType = default_memory,
    .GetVariadicInputMinArity = one,
    .GetVariadicInputHomogeneity = one,
    .GetVariadicOutputMinArity = one,
    .GetVariadicOutputHomogeneity = one,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
};

/* Entry point onnxruntime calls from SessionOptions.register_custom_ops_library. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(TW_ORT_API_VERSION);
    if (api == NULL) return NULL; /* onnxruntime older than 1.17: nothing registered, the graph won't load */
    if (!tw_cpu_supported())
        return TW_API(api, CreateStatus)(TW_ORT_FAIL, "tokenwire native kernels need AVX-512 VNNI");
    OrtCustomOpDomain *domain = NULL;
    TRY(TW_API(api, CreateCustomOpDomain)("ai.tokenwire", &domain));
    TRY(TW_API(api, CustomOpDomain_Add)(domain, &linear_op));
    return TW_API(api, AddCustomOpDomain)(options, domain);
}

/* For the loader's checks: 1 when this CPU can run the kernels. */
__attribute__((visibility("default"))) int tw_native_supported(void) { return tw_cpu_supported(); }
