// The `mail_notifier` example's modules, compiled into the test crates that run the example
// (`include!`d at their crate root, where the modules' `crate::` paths expect them).

#[allow(dead_code)] // each test uses part of each example module
#[path = "../../examples/mail_notifier/demo.rs"]
mod demo;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/event.rs"]
mod event;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/kafka.rs"]
mod kafka;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/mailer.rs"]
mod mailer;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/notifier.rs"]
mod notifier;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/ops_server.rs"]
mod ops_server;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/samples.rs"]
mod samples;
#[allow(dead_code)]
#[path = "../../examples/mail_notifier/smtp_server.rs"]
mod smtp_server;
