//! A plan's handle: the tensor through which a plan crosses torch's op boundary. It is a one-element int64 CPU
//! tensor holding the plan's id in a registry of live plans, and its storage owns the registry entry: the plan is
//! freed when the last tensor using that storage is (autograd's saved tensors and compiled graphs' included).
//! A tensor that is not a live handle (a copy outliving its original, any other tensor) resolves to an error.

use crate::device_plan::DevicePlan;
use crate::shim;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

fn live() -> &'static Mutex<HashMap<i64, Arc<DevicePlan>>> {
    static LIVE: OnceLock<Mutex<HashMap<i64, Arc<DevicePlan>>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

extern "C" fn release(id: i64) {
    // The plan (and its device tables) is dropped after the lock is released.
    let plan = live().lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    drop(plan);
}

/// Registers `plan` and returns its handle.
pub fn publish(plan: DevicePlan) -> Result<Tensor, tch::TchError> {
    static NEXT: AtomicI64 = AtomicI64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    live().lock().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::new(plan));
    let mut out = std::ptr::null_mut();
    // SAFETY: the shim writes a new at::Tensor into `out` or returns an error message.
    let err = unsafe { shim::sp_handle_tensor(id, release, &mut out) };
    if let Err(e) = shim::check(err) {
        release(id);
        return Err(e);
    }
    // SAFETY: `out` is an owned at::Tensor pointer from the shim.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// The live plan `handle` names, or why it names none.
pub fn resolve(handle: &Tensor) -> Result<Arc<DevicePlan>, String> {
    if handle.kind() != Kind::Int64 || handle.device() != Device::Cpu || handle.numel() != 1 {
        return Err(format!(
            "expected a plan's handle (Plan.handle: one int64 on the CPU), got a {:?} tensor of shape {:?}",
            handle.kind(),
            handle.size()
        ));
    }
    // SAFETY: one int64 element on the host, checked above.
    let id = unsafe { *(handle.data_ptr() as *const i64) };
    live()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned()
        .ok_or_else(|| "not the handle of a live plan (Plan.handle; a copy of one does not keep it alive)".to_string())
}
