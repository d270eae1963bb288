//! Where forward passes run: `--device auto|cpu|cuda[:N]` is parsed into a
//! [`DeviceRequest`] at the command line and opened once into a [`Device`],
//! which is handed to calibration, selection and eval. CUDA is the `cuda`
//! cargo feature, forwarded to candle; without it `cuda` is a clear error and
//! `auto` means the CPU. No code below the command line picks a device.

use std::str::FromStr;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The first CUDA device when this build has CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| format!("`{text}`: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device cuda:{0}: this obim was built without CUDA support; build it with `cargo build --release --features cuda`"
    )]
    NotCompiled(usize),
    #[error("--device cuda:{ordinal}: cannot open the CUDA device: {source}")]
    Cuda {
        ordinal: usize,
        source: candle_core::Error,
    },
}

/// An opened device and its name (`cpu`, `cuda:0`) for reports.
#[derive(Debug, Clone)]
pub struct Device {
    candle: candle_core::Device,
    name: String,
}

impl Device {
    pub fn open(request: DeviceRequest) -> Result<Device, DeviceError> {
        match request {
            DeviceRequest::Cpu => Ok(Device::host()),
            DeviceRequest::Auto => Ok(Device::cuda(0).unwrap_or_else(|_| Device::host())),
            DeviceRequest::Cuda(ordinal) => Device::cuda(ordinal),
        }
    }

    fn host() -> Device {
        Device {
            candle: candle_core::Device::Cpu,
            name: "cpu".into(),
        }
    }

    fn cuda(ordinal: usize) -> Result<Device, DeviceError> {
        if !candle_core::utils::cuda_is_available() {
            return Err(DeviceError::NotCompiled(ordinal));
        }
        let candle = candle_core::Device::new_cuda(ordinal)
            .map_err(|source| DeviceError::Cuda { ordinal, source })?;
        Ok(Device {
            candle,
            name: format!("cuda:{ordinal}"),
        })
    }

    /// The candle device tensors are made on.
    pub fn candle(&self) -> &candle_core::Device {
        &self.candle
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert!("gpu".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn auto_and_cpu_open_without_cuda() {
        assert_eq!(
            Device::open(DeviceRequest::Cpu).map(|d| d.name).ok(),
            Some("cpu".into())
        );
        let auto = Device::open(DeviceRequest::Auto).map(|d| d.name);
        assert!(auto.is_ok());
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(
                Device::open(DeviceRequest::Cuda(0)),
                Err(DeviceError::NotCompiled(0))
            ));
        }
    }
}
