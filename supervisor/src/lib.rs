//! `nbsupervisor`: the notebook container's PID 1 (in progress).
