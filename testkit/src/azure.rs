//! An Azure IoT Hub emulator (work in progress): the plain types first.

pub mod topics;
pub mod twin;
