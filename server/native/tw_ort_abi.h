/* The slice of onnxruntime's C ABI that tw_ops.c uses, declared by us.

   The onnxruntime wheel ships no C headers, so the custom-op library declares what it calls:
   OrtApi is an append-only table of function pointers, and these are the slots (0-based) of
   the functions we use, stable since they were added (KernelContext_ParallelFor: 1.17).
   Requested at API version 17; onnxruntime returns NULL for an older runtime and we refuse
   to register. tests/test_native_kernels.py exercises every slot through a real session. */
#ifndef TW_ORT_ABI_H
#define TW_ORT_ABI_H
#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtTypeInfo OrtTypeInfo;
typedef struct OrtApi OrtApi;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

#define TW_ORT_API_VERSION 17

enum { TW_ORT_FAIL = 1, TW_ORT_INVALID_ARGUMENT = 2 };
enum { TW_TENSOR_UNDEFINED = 0, TW_TENSOR_FLOAT = 1, TW_TENSOR_UINT8 = 2, TW_TENSOR_INT32 = 6, TW_TENSOR_INT64 = 7,
       TW_TENSOR_FLOAT16 = 10 };

/* OrtApi slots. */
enum {
    TW_SLOT_CreateStatus = 0,
    TW_SLOT_CreateCustomOpDomain = 26,
    TW_SLOT_CustomOpDomain_Add = 27,
    TW_SLOT_AddCustomOpDomain = 28,
    TW_SLOT_GetTensorMutableData = 51,
    TW_SLOT_CastTypeInfoToTensorInfo = 55,
    TW_SLOT_GetTensorElementType = 60,
    TW_SLOT_GetDimensionsCount = 61,
    TW_SLOT_GetDimensions = 62,
    TW_SLOT_GetTensorShapeElementCount = 64,
    TW_SLOT_GetTensorTypeAndShape = 65,
    TW_SLOT_KernelInfoGetAttribute_float = 85,
    TW_SLOT_KernelInfoGetAttribute_int64 = 86,
    TW_SLOT_KernelInfoGetAttribute_string = 87,
    TW_SLOT_KernelContext_GetInputCount = 88,
    TW_SLOT_KernelContext_GetInput = 90,
    TW_SLOT_KernelContext_GetOutput = 91,
    TW_SLOT_ReleaseStatus = 93,
    TW_SLOT_ReleaseTypeInfo = 98,
    TW_SLOT_ReleaseTensorTypeAndShapeInfo = 99,
    TW_SLOT_KernelInfo_GetInputTypeInfo = 234,
    TW_SLOT_KernelContext_ParallelFor = 274,
};

typedef OrtStatus *(*tw_CreateStatus)(int code, const char *msg);
typedef OrtStatus *(*tw_CreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*tw_CustomOpDomain_Add)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*tw_AddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*tw_GetTensorMutableData)(OrtValue *value, void **out);
typedef OrtStatus *(*tw_GetTensorElementType)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*tw_GetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*tw_GetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count);
typedef OrtStatus *(*tw_GetTensorShapeElementCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*tw_GetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*tw_KernelInfoGetAttribute_float)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*tw_KernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*tw_KernelInfoGetAttribute_string)(const OrtKernelInfo *info, const char *name, char *out,
                                                      size_t *size);
typedef OrtStatus *(*tw_KernelContext_GetInputCount)(const OrtKernelContext *ctx, size_t *out);
typedef OrtStatus *(*tw_KernelContext_GetInput)(const OrtKernelContext *ctx, size_t index, const OrtValue **out);
typedef OrtStatus *(*tw_KernelContext_GetOutput)(OrtKernelContext *ctx, size_t index, const int64_t *dims,
                                                 size_t count, OrtValue **out);
typedef void (*tw_ReleaseStatus)(OrtStatus *status);
typedef OrtStatus *(*tw_CastTypeInfoToTensorInfo)(const OrtTypeInfo *info, const OrtTensorTypeAndShapeInfo **out);
typedef void (*tw_ReleaseTypeInfo)(OrtTypeInfo *info);
typedef OrtStatus *(*tw_KernelInfo_GetInputTypeInfo)(const OrtKernelInfo *info, size_t index, OrtTypeInfo **out);
typedef void (*tw_ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*tw_KernelContext_ParallelFor)(const OrtKernelContext *ctx, void (*fn)(void *, size_t),
                                                   size_t total, size_t num_batch, void *user);

#define TW_API(api, name) ((tw_##name)(((void *const *)(api))[TW_SLOT_##name]))

/* OrtCustomOp, read by onnxruntime up to the fields of its `version` (16: the V2 entry points). */
typedef struct TwCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct TwCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct TwCustomOp *op);
    int (*GetInputType)(const struct TwCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct TwCustomOp *op);
    int (*GetOutputType)(const struct TwCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct TwCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct TwCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct TwCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct TwCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct TwCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct TwCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct TwCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct TwCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct TwCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
    void *InferOutputShapeFn;
    void *GetStartVersion;
    void *GetEndVersion;
    void *GetMayInplace;
    void *ReleaseMayInplace;
    void *GetAliasMap;
    void *ReleaseAliasMap;
} TwCustomOp;
#endif
