// One pass over a weight for SGD with momentum plus the L2-SP pull.
//
// Keras's momentum update, with the gradient of alpha * ||w - w0||^2 added to
// the data gradient, and the squared distance ||w - w0||^2 (before the update)
// as the output:
//
//   d = w - w0;  g' = g + coef * d;  a = m * a - lr * g';  w += a
//   (Nesterov: w += m * a - lr * g')
//
// Done with TensorFlow's own ops this reads and writes each weight-sized
// buffer some 14 times (the penalty, its gradient, their sum, the update);
// here it is 4 reads and 2 writes. The arithmetic is the same, in the same
// order, so the weights match the unfused step bit for bit.
//
// Built by tfxfer.kernels at first use, against the installed TensorFlow.

#include <algorithm>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/lib/core/threadpool.h"

namespace tfxfer {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::Var;

REGISTER_OP("TfxferAnchoredMomentum")
    .Input("var: resource")
    .Input("accum: resource")
    .Input("anchor: float")
    .Input("grad: float")
    .Input("lr: float")
    .Input("momentum: float")
    .Input("coef: float")
    .Output("distance: float")
    .Attr("use_nesterov: bool = false")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    });

namespace {

// Elements per block: the squared distance is summed per block, then over
// blocks in order, so the result does not depend on the number of threads.
constexpr int64_t kBlock = 1 << 15;

// The variable's buffer, made private first if a reader still holds it (as
// TensorFlow's own training ops do), so the update cannot change their value.
absl::Status Writable(OpKernelContext* ctx, Var* var, Tensor** out) {
  Tensor* t = var->tensor();
  if (!t->RefCountIsOne()) {
    Tensor copy;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(t->dtype(), t->shape(), &copy));
    std::copy_n(t->flat<float>().data(), t->NumElements(), copy.flat<float>().data());
    *t = copy;
  }
  *out = t;
  return absl::OkStatus();
}

class AnchoredMomentumOp : public OpKernel {
 public:
  explicit AnchoredMomentumOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_nesterov", &nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<Var> var, accum;
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 0), &var));
    OP_REQUIRES_OK(ctx, tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, 1), &accum));
    tensorflow::mutex_lock var_lock(*var->mu());
    tensorflow::mutex_lock accum_lock(*accum->mu());
    OP_REQUIRES(ctx, var->tensor()->IsInitialized() && accum->tensor()->IsInitialized(),
                absl::FailedPreconditionError("TfxferAnchoredMomentum: uninitialized variable."));
    OP_REQUIRES(ctx, var->tensor()->dtype() == tensorflow::DT_FLOAT && accum->tensor()->dtype() == tensorflow::DT_FLOAT,
                absl::InvalidArgumentError("TfxferAnchoredMomentum: float32 variables only."));
    const Tensor& anchor = ctx->input(2);
    const Tensor& grad = ctx->input(3);
    const tensorflow::TensorShape& shape = var->tensor()->shape();
    OP_REQUIRES(ctx, accum->tensor()->shape() == shape && anchor.shape() == shape && grad.shape() == shape,
                absl::InvalidArgumentError("TfxferAnchoredMomentum: var, accum, anchor and grad differ in shape: " +
                                           shape.DebugString() + ", " + accum->tensor()->shape().DebugString() + ", " +
                                           anchor.shape().DebugString() + ", " + grad.shape().DebugString()));
    Tensor *w_tensor, *a_tensor;
    OP_REQUIRES_OK(ctx, Writable(ctx, var.get(), &w_tensor));
    OP_REQUIRES_OK(ctx, Writable(ctx, accum.get(), &a_tensor));

    float* w = w_tensor->flat<float>().data();
    float* a = a_tensor->flat<float>().data();
    const float* w0 = anchor.flat<float>().data();
    const float* g = grad.flat<float>().data();
    const float lr = ctx->input(4).scalar<float>()();
    const float m = ctx->input(5).scalar<float>()();
    const float coef = ctx->input(6).scalar<float>()();
    const bool nesterov = nesterov_;

    const int64_t n = w_tensor->NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(blocks, 0.0);
    auto run = [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t end = std::min(n, (b + 1) * kBlock);
        double sum = 0.0;
        for (int64_t i = b * kBlock; i < end; ++i) {
          const float d = w[i] - w0[i];
          sum += static_cast<double>(d) * d;
          const float step = g[i] + coef * d;
          const float next = a[i] * m - step * lr;
          a[i] = next;
          w[i] += nesterov ? next * m - step * lr : next;
        }
        partial[b] = sum;
      }
    };
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(blocks, kBlock * 8, run);

    double total = 0.0;
    for (double p : partial) total += p;
    Tensor* distance = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}), &distance));
    distance->scalar<float>()() = static_cast<float>(total);
  }

 private:
  bool nesterov_;
};

}  // namespace

REGISTER_KERNEL_BUILDER(Name("TfxferAnchoredMomentum").Device(tensorflow::DEVICE_CPU), AnchoredMomentumOp);

}  // namespace tfxfer
