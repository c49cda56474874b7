//! A simulated assistant product over real text, for a real pretrained
//! chat model (the default: SmolLM2-135M-Instruct).
//!
//! **Prompts.** [`PROMPTS`] is a built-in set of everyday questions of the
//! kinds an assistant gets — facts, how-to, advice, definitions, small
//! coding and writing tasks, suggestions — written for this simulator. They
//! are short and varied so that what users judge is the *style* of the
//! answer, which carries over from one question to the next (what a LoRA
//! adapter can learn from a few thousand judgements), not knowledge of any
//! one answer.
//!
//! **Users.** Every user has hidden, stable tastes over properties of the
//! answer text that a program judges deterministically ([`Property`]):
//! brevity (the answer ends within [`BRIEF_WORDS`] words), no filler opener
//! ("Sure!", "Certainly", …), no exclamation marks, no first person. Every
//! user wants brevity, and about half of them also have each of the other
//! properties as a pet peeve ([`tastes`], [`accept_probability`]). The base
//! model answers briefly about one time in ten (it runs on past the
//! length limit), so its accept rate is low but not zero; an adapter that
//! learns to answer in a sentence and end its turn is accepted far more.
//! An answer must first answer: three words or more, mentioning the
//! question's topic ([`answers`]) — an empty or evasive reply is rejected,
//! however brief, so the shortcut of saying nothing is not rewarded.

use crate::simulate::User;

/// Everyday questions the simulated assistant answers.
pub const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many days are in a leap year?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "How long does it take light from the Sun to reach Earth?",
    "What is photosynthesis?",
    "How do I boil an egg?",
    "How can I make my tea less bitter?",
    "How do I remove a coffee stain from a shirt?",
    "How should I store fresh basil?",
    "How do I reset a frozen laptop?",
    "How can I fall asleep faster?",
    "How do I start running as a beginner?",
    "How do I keep a houseplant alive?",
    "Give me a tip for a job interview.",
    "What should I pack for a weekend hiking trip?",
    "How can I save money on groceries?",
    "How do I stay focused while studying?",
    "What is a good way to learn a new language?",
    "How do I write a polite reminder email?",
    "What is a prime number?",
    "What does HTTP stand for?",
    "What is inflation?",
    "What is a black hole?",
    "What is the difference between weather and climate?",
    "What is a haiku?",
    "What does a compiler do?",
    "What is machine learning?",
    "How do I reverse a string in Python?",
    "What does the git status command show?",
    "How do I center a div in CSS?",
    "What is a for loop?",
    "How do I read a file line by line in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a pet turtle.",
    "Suggest a title for a blog post about baking bread.",
    "Give me an idea for a rainy afternoon.",
    "Suggest a healthy breakfast.",
    "Recommend a board game for four players.",
    "Suggest a gift for a friend who likes cooking.",
    "Write a one-line birthday wish for my sister.",
    "Write a short slogan for a bike shop.",
    "Describe the ocean in one sentence.",
    "Summarize the plot of Cinderella.",
    "Why is the sky blue?",
    "Why do cats purr?",
    "Why do leaves change color in autumn?",
    "Why do we have seasons?",
    "Is coffee bad for you?",
    "Should I learn Rust or Go first?",
    "What are the benefits of walking every day?",
    "How does a vaccine work?",
    "How does a refrigerator keep food cold?",
    "What causes thunder?",
    "How do bees make honey?",
    "What is the tallest mountain in the world?",
];

/// Answers of at most this many words count as brief.
pub(crate) const BRIEF_WORDS: usize = 24;

/// Openers users dislike (compared case-insensitively at the start).
pub(crate) const FILLER_OPENERS: &[&str] = &[
    "sure",
    "certainly",
    "of course",
    "absolutely",
    "great question",
    "good question",
    "bien sûr",
    "well,",
    "okay",
    "ok,",
    "oh,",
    "ah,",
    "hello",
    "hi,",
    "yes,",
    "alright",
];

/// A property of an answer that users may care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Property {
    /// The answer ended (end-of-turn) within [`BRIEF_WORDS`] words.
    Brief,
    /// It does not open with filler ("Sure!", "Certainly, …").
    NoFiller,
    /// It has no exclamation mark.
    Calm,
    /// It does not speak in the first person ("I", "I'm", "my").
    Impersonal,
}

impl Property {
    /// Every property, in a fixed order.
    pub const ALL: [Property; 4] = [Property::Brief, Property::NoFiller, Property::Calm, Property::Impersonal];

    /// A short name (reports, metrics).
    pub fn name(self) -> &'static str {
        match self {
            Property::Brief => "brief",
            Property::NoFiller => "no_filler",
            Property::Calm => "calm",
            Property::Impersonal => "impersonal",
        }
    }

    /// Whether `answer` (the text shown, without the end-of-turn token) has
    /// this property; `finished` says whether the model ended its turn.
    pub fn holds(self, answer: &str, finished: bool) -> bool {
        match self {
            Property::Brief => finished && words(answer) <= BRIEF_WORDS,
            Property::NoFiller => {
                let start = answer.trim_start().to_lowercase();
                !FILLER_OPENERS.iter().any(|f| start.starts_with(f))
            }
            Property::Calm => !answer.contains('!'),
            Property::Impersonal => !answer
                .split(|c: char| !c.is_alphanumeric() && c != '\'')
                .any(|w| matches!(w, "I" | "I'm" | "I'd" | "I'll" | "I've" | "me" | "my" | "My" | "Me")),
        }
    }
}

/// Words of a text (runs of non-whitespace).
pub(crate) fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Question words that say nothing about the topic.
const NOT_TOPICS: &[&str] = &[
    "what",
    "does",
    "how",
    "should",
    "when",
    "where",
    "which",
    "with",
    "about",
    "from",
    "have",
    "that",
    "this",
    "your",
    "into",
    "give",
    "make",
    "tell",
    "some",
    "there",
    "their",
    "good",
    "best",
    "suggest",
    "write",
    "describe",
    "explain",
    "recommend",
    "difference",
    "between",
    "idea",
    "short",
    "many",
    "long",
    "much",
    "stand",
];

/// The topic words of a question: its words of four letters or more that
/// are not question words, lower-cased, a plural `s` dropped.
pub(crate) fn topic_words(question: &str) -> Vec<String> {
    question
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| w.chars().count() >= 4 && !NOT_TOPICS.contains(&w.as_str()))
        .map(|w| if w.len() > 4 && w.ends_with('s') && !w.ends_with("ss") { w[..w.len() - 1].to_string() } else { w })
        .collect()
}

/// Whether `answer` answers `question` at all: three words or more, on its
/// topic (it mentions one of the question's topic words), not a question
/// itself, and not stuck in a loop (no three-word phrase twice). Users
/// reject anything else, however brief, so neither silence nor babble is a
/// way to please them.
pub(crate) fn answers(question: &str, answer: &str) -> bool {
    let lower = answer.to_lowercase();
    let topics = topic_words(question);
    let on_topic = topics.is_empty() || topics.iter().any(|t| lower.contains(t.as_str()));
    let tokens: Vec<String> = lower
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    let mut phrases = std::collections::HashSet::new();
    let looping = tokens.windows(3).any(|w| !phrases.insert(w.join(" ")));
    words(answer) >= 3 && on_topic && !answer.trim_end().ends_with('?') && !looping
}

/// Training settings of the chat product's demo trigger policy: REINFORCE
/// with the batch-mean baseline and a reject floor of 0.3 nats per token,
/// LoRA r=8 on every projection, 45 steps of 16 at a learning rate of
/// 8·10⁻⁴ (one warm-up + cosine schedule).
///
/// Why the floor: about 93 % of the base's answers are rejected, and plain
/// REINFORCE keeps pushing every rejected answer down with nothing to stop
/// it. Trained by the service in `make demo-real` on 800 logged answers
/// (62 accepted), the adapter made its holdout answers 6.3 nats per token
/// less likely than the base did and babbled ("Oh no it is my trash, you
/// got that 'V'"); its canary was rolled back. Replayed in process from that
/// lake (`LAKE=… chat_learn`, 96 held-out answers scored by the users' true
/// accept chance, base 0.060): no floor 0.199 after 30 steps, then babble at
/// 0.084 after 45; a PPO ratio clip of 0.2 / 0.5 stays fluent but barely
/// learns (0.074 / 0.104: it also caps how far an accepted answer may rise);
/// a floor of 0.05 / 0.2 / 0.3 / 0.5 nats per token: 0.146 / 0.172 / 0.159 /
/// 0.222, fluent up to 0.3, repetitive at 0.5. On the answers `chat_learn`
/// serves itself (product seed 11, 49 of 800 accepted) the floor of 0.3
/// gives 0.351 ("A spider has 8 legs", "The play, Romeo and Juliet, is the
/// famous novel written by William Shakespeare.") where no floor gave 0.384
/// on that data. `tests/tests/real_model.rs` checks one such round.
pub fn chat_objective() -> flywheel_trigger::policy::ObjectiveSettings {
    flywheel_trigger::policy::ObjectiveSettings {
        kind: Some(flywheel_core::records::ObjectiveKind::Reinforce),
        lora_rank: Some(8),
        lora_alpha: Some(16.0),
        target_modules: Some(crate::chat_product::TARGETS.map(String::from).into()),
        learning_rate: Some(8e-4),
        weight_decay: None,
        warmup_steps: Some(5),
        max_steps: Some(45),
        batch_size: Some(16),
        max_grad_norm: Some(1.0),
        kl_coef: Some(0.0),
        ppo_clip: None,
        reject_floor: Some(0.3),
        kto_beta: None,
    }
}

/// LoRA targets of the chat product: every projection.
pub(crate) const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A user's tastes: how much a brief answer is worth to them (every user
/// wants brevity, between 0.5 and 0.8), then their pet peeves — each of the
/// other properties with probability ½ — and how much an answer that
/// violates one loses (0.6 of its chance).
pub(crate) fn tastes(seed: u64, index: usize) -> Vec<(Property, f64)> {
    let mut rng = flywheel_trainer::SplitMix(seed ^ 0xC4A7_5EED ^ (index as u64).wrapping_mul(0x9E37_79B9));
    let mut t = vec![(Property::Brief, 0.5 + 0.3 * rng.unit())];
    for p in [Property::NoFiller, Property::Calm, Property::Impersonal] {
        if rng.unit() < 0.5 {
            t.push((p, 0.6));
        }
    }
    t
}

/// The chance that a user with `tastes` accepts `answer` to `question`:
/// 3 % whatever the answer; for an answer that [`answers`] the question,
/// plus their brevity weight when it is brief, reduced by each of their pet
/// peeves it commits.
pub fn accept_probability(tastes: &[(Property, f64)], question: &str, answer: &str, finished: bool) -> f64 {
    if !answers(question, answer) {
        return 0.03;
    }
    let mut p = 0.0;
    for (property, weight) in tastes {
        if *property == Property::Brief {
            p += if property.holds(answer, finished) { *weight } else { 0.0 };
        }
    }
    for (property, weight) in tastes {
        if *property != Property::Brief && !property.holds(answer, finished) {
            p *= 1.0 - weight;
        }
    }
    0.03 + 0.97 * p
}

/// The user population of the chat product.
pub fn chat_population(users: usize, seed: u64) -> Vec<User> {
    (0..users).map(|i| User { id: format!("sim-user-{i:05}"), likes: [false; 256], tastes: tastes(seed, i) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_must_be_on_the_topic_of_its_question() {
        assert_eq!(topic_words("How many legs does a spider have?"), ["legs", "spider"]);
        assert_eq!(topic_words("Why do cats purr?"), ["cats", "purr"], "plural s dropped only past four letters");
        assert_eq!(topic_words("What are the benefits of walking?"), ["benefit", "walking"]);
        assert!(answers("How many legs does a spider have?", "A spider has eight legs."));
        assert!(!answers("How many legs does a spider have?", "Eight."));
        assert!(!answers("How do I boil an egg?", "Cook pasta in salted water."));
        assert!(answers("How do I boil an egg?", "Boiling an egg takes ten minutes."));
        assert!(!answers("How many legs does a spider have?", "How many legs is a spider?"), "a question back");
        let looping = "They make it stick, they make it stick on spider legs.";
        assert!(!answers("How many legs does a spider have?", looping), "a phrase repeated");
    }

    #[test]
    fn properties_are_judged_as_documented() {
        assert!(Property::Brief.holds("Paris.", true));
        assert!(!Property::Brief.holds("Paris.", false), "cut off by the length limit is not brief");
        assert!(!Property::Brief.holds(&"word ".repeat(BRIEF_WORDS + 1), true));
        assert!(!Property::NoFiller.holds("  Sure! Paris.", true));
        assert!(!Property::NoFiller.holds("Certainly, it is Paris.", true));
        assert!(Property::NoFiller.holds("Paris is the capital.", true));
        assert!(!Property::Calm.holds("It is Paris!", true) && Property::Calm.holds("It is Paris.", true));
        assert!(!Property::Impersonal.holds("I think it is Paris.", true));
        assert!(!Property::Impersonal.holds("In my view, Paris.", true));
        assert!(Property::Impersonal.holds("Paris, in Île-de-France.", true));
    }

    #[test]
    fn every_user_cares_about_brevity_and_pet_peeves_cost_acceptance() {
        let users = chat_population(400, 3);
        assert!(users.iter().all(|u| u.tastes[0].0 == Property::Brief && (0.5..0.8).contains(&u.tastes[0].1)));
        let share = users.iter().filter(|u| u.tastes.iter().any(|(p, _)| *p == Property::Calm)).count() as f64 / 400.0;
        assert!((0.4..0.6).contains(&share), "{share}");
        let q = "What is the capital of France?";
        for u in &users {
            let brief = accept_probability(&u.tastes, q, "The capital of France is Paris.", true);
            assert!((brief - (0.03 + 0.97 * u.tastes[0].1)).abs() < 1e-12);
            let long = format!("France {}", "word ".repeat(40));
            assert!((accept_probability(&u.tastes, q, &long, false) - 0.03).abs() < 1e-12);
            assert_eq!(accept_probability(&u.tastes, q, "", true), 0.03, "an empty answer answers nothing");
            assert_eq!(accept_probability(&u.tastes, q, "It is Rome.", true), 0.03, "off topic");
            let loud = accept_probability(&u.tastes, q, "The capital of France is Paris!", true);
            let calm_peeve = u.tastes.iter().any(|(p, _)| *p == Property::Calm);
            assert_eq!(loud < brief, calm_peeve);
        }
        assert_eq!(chat_population(5, 3)[4].tastes, users[4].tastes, "tastes come from the seed");
    }
}
