//! ATen's flash attention for CPU, the CPU default: a dense kernel (`dense::Runs`) that returns the log-sum-exp,
//! takes GQA natively and accepts strided views.

use crate::dense::{no_window, Dense};
use crate::seam::{Result, Saved};
use tch::Tensor;

pub struct CpuFlash;

impl Dense for CpuFlash {
    fn fwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, window: Option<usize>, scale: f64)
        -> Result<(Tensor, Tensor)> {
        no_window("cpu_flash", window)?;
        Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, None::<Tensor>, scale)
    }

    fn bwd(&self, s: &Saved, causal: bool, window: Option<usize>, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
        no_window("cpu_flash", window)?;
        Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
            s.dout, s.q, s.k, s.v, s.out, s.lse, 0.0, causal, None::<Tensor>, scale,
        )
    }
}

