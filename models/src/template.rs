//! Chat templates: messages -> the prompt text a model was trained on.
//!
//! Owns rendering a list of role/content messages with the model's Jinja template
//! (GGUF `tokenizer.chat_template`) through minijinja, configured like Hugging Face's
//! renderer: `trim_blocks` and `lstrip_blocks` on, Python string methods
//! (`.strip()`, `.startswith()`, ...) available, `raise_exception(msg)` failing the
//! render with `msg`. Templates come from model files and are untrusted: rendering is
//! bounded by a fuel limit, so a template cannot loop forever. When the model carries
//! no template, its family picks one: ChatML ([`ChatTemplate::fallback`]) for llama
//! models, [`GEMMA_TEMPLATE`] for Gemma 3. When the tokenizer adds BOS itself, a BOS
//! the template writes at the very start is dropped
//! ([`ChatTemplate::strip_leading_bos`]), as llama.cpp does, so it is not doubled. The
//! template compiles once, at construction.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::ModelError;

/// ChatML, used when a model carries no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Google's Gemma 3 template (from the instruction-tuned model's tokenizer config):
/// a leading system message is folded into the first user turn, `assistant` is called
/// `model`, roles must alternate.
pub const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// Enough fuel for any real template on long conversations; a runaway loop runs out.
const FUEL: u64 = 5_000_000;

const NAME: &str = "chat";

/// One chat message as templates see it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    strip_leading_bos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("strip_leading_bos", &self.strip_leading_bos)
            .finish()
    }
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are exposed to it by those names.
    pub fn new(
        source: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ModelError::Template(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            strip_leading_bos: false,
        })
    }

    /// With `strip`, a BOS token the template renders at the very start is dropped:
    /// for tokenizers that add BOS themselves.
    pub fn strip_leading_bos(mut self, strip: bool) -> Self {
        self.strip_leading_bos = strip;
        self
    }

    /// ChatML, for models without a template of their own.
    pub fn fallback(
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ModelError> {
        Self::new(CHATML_TEMPLATE, bos_token, eos_token)
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the
    /// assistant's answer should start.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        let text = template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::Template(describe(&e)))?;
        match text.strip_prefix(self.bos_token.as_str()) {
            Some(rest) if self.strip_leading_bos && !self.bos_token.is_empty() => {
                Ok(rest.to_string())
            }
            _ => Ok(text),
        }
    }
}

/// minijinja's message plus its detail and line, on one line.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text.push_str(": ");
            text.push_str(detail);
        }
    }
    text
}
