
pub mod guest;
