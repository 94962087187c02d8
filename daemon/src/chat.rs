//! Chat templates: the Jinja templates Hugging Face checkpoints ship (`tokenizer_config.json`'s
//! `chat_template`, GGUF's `tokenizer.chat_template`), rendered with minijinja plus the
//! Python-style string methods such templates call (`.strip()`, `.startswith()`, ...).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `tool`, where the template knows it).
    pub role: String,
    /// The text.
    pub content: String,
}

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model ships no chat template.
    #[error("this model has no chat template; send a raw `prompt` instead of `messages`")]
    NoTemplate,
    /// The template does not parse.
    #[error("the model's chat template is invalid: {0}")]
    Invalid(String),
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("the chat template rejected the conversation: {0}")]
    Render(String),
}

/// Template instructions one render may run (minijinja's fuel). A template comes from a model
/// file, so it is code from outside: without a bound, `{% for a in range(100000) %}{% for b in
/// range(100000) %}` would hold the model's thread for hours. Real templates stay far below:
/// Qwen3's, the largest measured, runs 72,000 instructions for 1,024 messages (the most a request
/// may send); 2 million take about 0.2 s.
pub const RENDER_FUEL: u64 = 2_000_000;

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are the strings templates splice in.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Templates written for Python Jinja rely on trim_blocks / lstrip_blocks, as
        // transformers renders them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_template_owned("chat", source.to_string()).map_err(|e| ChatError::Invalid(e.to_string()))?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Renders `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").map_err(|e| ChatError::Invalid(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ChatError::Render(render_error(&e)))
    }
}

fn render_error(e: &Error) -> String {
    if e.kind() == ErrorKind::OutOfFuel {
        return format!("it ran more than {RENDER_FUEL} template instructions without finishing (a runaway loop?)");
    }
    match e.detail() {
        Some(d) => format!("{d} ({})", e.kind()),
        None => e.to_string(),
    }
}

/// Today's date in the few `strftime` forms templates use (Llama 3.x puts it in the system
/// prompt); anything else is left as the format string.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const SHORT: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%B", MONTHS[(month - 1) as usize])
        .replace("%b", SHORT[(month - 1) as usize])
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
}

/// (year, month 1-12, day 1-31) of the proleptic Gregorian date `days` after 1970-01-01
/// (Howard Hinnant's civil-from-days).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect()
    }

    /// ChatML as Qwen and SmolLM2 ship it (a system default when none is given).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_default_system_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t.render(&msgs(&[("user", "Hi")]), true).unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&msgs(&[("system", "S"), ("user", "Q"), ("assistant", "A")]), false).unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n");
    }

    #[test]
    fn python_string_methods_and_bos() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}: {{ m.content.strip() }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&msgs(&[("user", "  hey  ")]), false).unwrap(), "<s>USER: hey\n");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&msgs(&[("assistant", "x")]), false).unwrap_err().to_string();
        assert!(err.contains("Conversation must start with user"), "{err}");
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
    }

    #[test]
    fn a_runaway_template_is_stopped_with_an_error() {
        let src = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let started = std::time::Instant::now();
        let err = t.render(&msgs(&[("user", "x")]), true).unwrap_err().to_string();
        assert!(err.contains("template instructions"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
        // A long conversation through a real template stays far within the bound.
        let many: Vec<(&str, &str)> = (0..1024).map(|i| (["user", "assistant"][i % 2], "some text")).collect();
        ChatTemplate::new(CHATML, "", "").unwrap().render(&msgs(&many), true).unwrap();
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        assert!(matches!(ChatTemplate::new("{% for x in %}", "", ""), Err(ChatError::Invalid(_))));
    }

    #[test]
    fn strftime_now_renders_a_date() {
        let s = strftime_now("%d %B %Y");
        let parts: Vec<&str> = s.split(' ').collect();
        assert_eq!(parts.len(), 3, "{s}");
        assert!(parts[2].parse::<i32>().unwrap() >= 2024);
    }
}
